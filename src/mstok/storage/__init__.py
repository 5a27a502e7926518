"""Storage: everything mstok keeps on disk that needs no model family.

* :mod:`~mstok.storage.layout`: the names and layout of model, checkpoint and run folders, and
  finding the newest checkpoint of a run (the one owner of those names);
* :mod:`~mstok.storage.locate`: the loading rule (:func:`~mstok.storage.locate.locate_model`)
  every API loader and CLI command follows, and what counts as a hub id;
* :mod:`~mstok.storage.saved`: the saved-model format (``save_pretrained`` / ``from_pretrained``
  of a model's own class, reading a ``config.json``);
* :mod:`~mstok.storage.weights`: pretrained weight files (explicit path, cache, download) and
  reading a state dict from safetensors or a ``torch.save`` file.

Everything here sits below the models, so a model class can save and load itself. Which family
a folder holds, hub downloads and the official converters need the model classes: they live in
:mod:`mstok.persistence`.
"""
