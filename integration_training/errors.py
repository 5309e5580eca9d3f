"""The one exception type for mistakes a user can fix.

Library code raises `UserError`; only `cli.py` turns it into exit code 2 and a one-line message.
"""


class UserError(Exception):
    """A problem the user caused and can fix (bad config, missing file, absent device...).

    The message must name the field or file and say what to do.
    """
