"""The bundle contract, torch-free: what tuneforge ships and every other floor reads or writes through.

    errors         TuneforgeError (the base of every user-facing error) and BundleError
    tasks          the task names, each defined once (Task)
    manifest       manifest.json: read, write, verify (standard library only)
    folders        the one guarded way to delete or replace a file or folder (run directories, bundles)
    preprocessing  image preprocessing as training and serving apply it (numpy, Pillow)
    inputs         graph inputs from raw texts and images with a bundle's own assets (tokenizers, numpy)
    decoding       KV-cache decoding steps over an ONNX decoder graph (numpy)

This floor imports nothing else of tuneforge (tests/test_layering.py); `compress` writes bundles through it,
`serve.runtime` reads them through it, `finetune` uses its preprocessing, task names and folder guard.
"""
