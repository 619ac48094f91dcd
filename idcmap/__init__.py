"""idcmap: reassemble IDC patch folders into slides, score them, and map the cancer."""

__version__ = "0.1.0"
