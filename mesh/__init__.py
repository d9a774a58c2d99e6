"""fedgate's shared core: the model, naming, codecs and routing maths.

Pure Python, standard library only, no I/O: every component imports this, so it must stay
cheap to import and trivially testable. Import-linter keeps I/O libraries out.
"""
