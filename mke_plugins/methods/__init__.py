"""mke_plugins.methods"""
