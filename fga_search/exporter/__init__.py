"""fga_search.export: private modules (the public names are re-exported by fga_search)."""
