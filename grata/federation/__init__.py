"""What the sites and the coordinator share, free of Flower and MLflow: the wire protocol (allowed
lists, audit, caps: protocol.py), the site configuration (siteconfig.py) and the federation
variants as strategy modules (strategies/). client/ and server/ both import this, never each other;
wire/ converts these plain dicts to and from Flower's records.
"""
