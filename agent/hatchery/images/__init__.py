"""The agent's image store: signed, content-addressed image artefacts (see docs/images-store.md).

``manifest`` (the signed manifest and its strict parser), ``signing`` (Ed25519 keys),
``store`` (objects and images on disk) and ``fetch`` (from a peer agent, resumable). The
routes that expose the store are in ``hatchery.api.images``: nothing here speaks HTTP as a
server.
"""
