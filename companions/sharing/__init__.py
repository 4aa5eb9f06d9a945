"""A trained model handed on to people without this program.

export.py         export: one ONNX file checked with ONNX Runtime, and --int8 beside it
offline_page.py   export --html: serve's page with the model inside, run by offline_page.js, no request
"""
