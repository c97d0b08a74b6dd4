"""fga_search.core: private modules (the public names are re-exported by fga_search)."""
