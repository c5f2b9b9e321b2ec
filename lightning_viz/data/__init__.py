"""Built-in datasets that need no download, as LightningDataModules."""
