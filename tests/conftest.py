import pyvl.testing

pyvl.testing.load_profile()
