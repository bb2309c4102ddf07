"""Tests of the Helm chart under deploy/helm/clipia-proxy."""
