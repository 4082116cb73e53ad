"""copiamail: a file-spool batch e-mail engine in the CopiaFacts style."""

__version__ = "0.1.0"
