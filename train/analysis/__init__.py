"""After training, without the base model: scan a cache with an SAE (`scan`), analyze its
features (`features`, with the tests in `significance`), report a run (`report`) and browse
its features (`browse`, over `browse_data`)."""
