"""fga_search.search: private modules (the public names are re-exported by fga_search)."""
