"""FastGen: fast text-to-image methods side by side with a 50-step baseline.

    python -m fastgen compare "a red circle" --family sdxl --out out/

Importing this package is cheap: nothing heavy loads until a model is used.
"""

__version__ = "0.1.0"
