"""PaDiM anomaly detection for surveillance video, fitted and scored at cluster scale on Ray."""
