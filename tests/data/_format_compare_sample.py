# What tests/test_architecture.py's format-name check must find (three comparisons); never imported.
kind = recipe = None
if kind == "int8" or recipe.format in ("gguf", "other") or recipe["format"] != "gguf":
    pass
