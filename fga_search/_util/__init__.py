"""fga_search._util: private modules (the public names are re-exported by fga_search)."""
