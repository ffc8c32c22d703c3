"""mke_plugins.world"""
