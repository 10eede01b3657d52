"""Entry points: ``peerd`` (daemon, demo) and ``peerctl``, and the node's
configuration from flags, files and the environment.

Modules:

Shells (I/O; import them by their full path, e.g. ``node.cli.config``):
    config         Node configuration (shell): flags, config file and ``PEERD_*
    daemon         ``peerd``: run one node, make a key, or run a local demo clu
    demo           ``peerd demo``: a local 3-node cluster with the example task
    peerctl        peerctl: look at and steer a peerd cluster through any node'
    settings       Node settings (core): :class:`NodeConfig`, each knob's meani
"""
