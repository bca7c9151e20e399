"""Data: HQ sources (synthetic faces, image folder, TFDS), Eq. 8 degradations, grain pipeline.

Import the module you need (``data.pipeline``, ``data.degradations``, ``data.sources``, ...): the
package itself imports nothing, so that reading one image does not load grain.
"""
