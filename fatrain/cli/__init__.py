"""The console scripts, one module each: parse or compose the config, call the library, report.

Nothing outside this package imports from it.
"""
