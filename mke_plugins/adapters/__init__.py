"""mke_plugins.adapters"""
