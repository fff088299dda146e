"""The package's one error class for a user's mistake: a bad option, a bad file, bad data.

Its message names the input (the option, the file, the row) and the fix. The command-line entry points
(`train_mcad.py`, `mcad-search`) print it as one paragraph and exit with status 2; any other exception is a bug in
the package or its dependencies and keeps its traceback, which a bug report needs.
"""


class UserError(ValueError):
    """
    A mistake the user can fix from the message: a bad option, a bad or damaged file, data that cannot be used, a
    refusal to overwrite earlier results. A `ValueError`, so code catching those keeps working.
    """
