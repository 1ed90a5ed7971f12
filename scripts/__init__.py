"""The commands users type: the shell scripts, and the recipe runner they call (`scripts.pipeline`, recipes in
``scripts/recipes/``). The top layer of the import contracts: it runs every entry point."""
