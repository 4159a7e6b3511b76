"""The measuring programs: `python -m profiling ...` from the checkout.

Not an installed package (Python 3.15's standard library has a module named
`profiling`); run it from the repository root.
"""
