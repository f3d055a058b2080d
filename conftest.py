# The plugin itself is loaded through its pytest11 entry point (pip install -e .).
# pytester drives the plugin's own tests in tests/; pytest_kvcache.testing gives them the
# reference server (kv_reference_server).
pytest_plugins = ("pytester", "pytest_kvcache.testing")
