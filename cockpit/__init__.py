"""The operator's cockpit: is the mesh healthy? `python -m cockpit status` (`make status`).

cockpit.collect reads every service over mTLS as the operator and pki/out, into dataclasses;
cockpit.status judges them (✔ / ✖ with the fix) and prints them.
"""
