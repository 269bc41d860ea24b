"""The dashboard: HTML pages (views.py), their templates and static files, and i18n."""
