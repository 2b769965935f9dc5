"""The ``foldserve`` command line: the top layer. One module per stage; nothing below imports it."""
