"""One module per ``anpyc`` command; each defines ``command``."""
