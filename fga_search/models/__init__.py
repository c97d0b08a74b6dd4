"""fga_search.models: private modules (the public names are re-exported by fga_search)."""
