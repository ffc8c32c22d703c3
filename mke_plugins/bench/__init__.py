"""mke_plugins.bench"""
