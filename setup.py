from pathlib import Path

from setuptools import setup

setup(
    name="mcad",
    version="0.1.0",
    description=(
        "Multi-teacher Cross-modal Alignment Distillation: small, fast image-text retrieval students "
        "for the Hugging Face Hub"
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["modeling_mcad", "modeling_mcad.shapes"],
    package_data={"modeling_mcad": ["metrics/*/*.py"]},
    py_modules=["train_mcad"],
    entry_points={"console_scripts": ["mcad-search = modeling_mcad.search:main"]},
    install_requires=[
        # <2.14 admits the 2.13.0 CPU wheel; an open range would pull a multi-GB CUDA build on CPU machines.
        "torch>=2.4,<2.14",
        "transformers>=5.20,<6",
        "accelerate>=1.10",
        "datasets>=4.0",
        "fsspec>=2023.1",  # images by URL in a streamed split (datasets depends on it too)
        "safetensors>=0.5",  # weights, and the gallery index of mcad-search
        "pyarrow>=15",  # mcad-search export (Parquet); datasets needs it too
        "huggingface_hub>=1.0",
        "evaluate>=0.4.6",
        "pillow>=10.0",
        "tokenizers>=0.21",
        "onnxruntime>=1.20",  # the torch-free query runtime (mcad-search: text encoder, gallery scan), the int8 export
        "onnx>=1.17",  # the export stage's graphs (torch.onnx.export with dynamo)
        "onnxscript>=0.5",
        "numpy>=1.26",
        "pyyaml>=6.0",
        "sentencepiece>=0.2",  # SigLIP / T5-style teacher tokenizers
        "tensorboard>=2.14",  # the training loop's tracker
        "jinja2>=3.1",  # model card templates
        "matplotlib>=3.8",  # the model card's recall plot
    ],
    extras_require={
        # Phone programs; pinned to the release that installs beside torch 2.13 without replacing it.
        "executorch": ["executorch==1.5.1"],
        # The tests also load exported students the way CLIP users do: sentence-transformers, and transformers.js
        # in Node (tests/js, installed by the tests themselves with npm).
        "dev": ["pytest>=8.0", "hypothesis>=6.100", "sentence-transformers>=6.0,<7"],
    },
)
