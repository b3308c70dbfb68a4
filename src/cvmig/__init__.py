"""cvmig: live migration for confidential virtual machines."""

__version__ = "0.1.0"
