# The plugin itself is loaded through its pytest11 entry point (pip install -e .).
# pytester drives the plugin's own tests in tests/.
pytest_plugins = ("pytester",)
