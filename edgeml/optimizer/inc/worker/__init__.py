"""Not imported by edgeml: the folder runs as a script in the INC environment (see __main__.py).

This file only makes it part of the package, so an installed edgeml ships it.
"""
