"""What the API, the worker and the command line share: settings, logging and the wire schemas of jobs and files."""

__version__ = "0.1.0"
