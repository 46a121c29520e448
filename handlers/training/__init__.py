"""Training and evaluation of the stages' models; not imported by the worker at run time."""
