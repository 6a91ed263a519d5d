"""What train.py and predict.py share on the command line. Standard library only: ``--help`` needs no torch."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's lines (the scripts' usage examples) as written, and appends "(default: ...)" to each
    flag's help unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        return help_text if "(default:" in help_text else super()._get_help_string(action)
