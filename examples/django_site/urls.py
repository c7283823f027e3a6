from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("api/ai/<str:provider>/chat", views.chat),
    path("api/embeddings", views.embeddings),
    path("health", views.health),
]
