"""One module per command family; `macprovider.cli` assembles them. Keep imports here light."""
