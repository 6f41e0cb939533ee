"""What certificates, keys, CRLs and SPIFFE IDs say, and reading the files that hold them safely."""

from __future__ import annotations

from shared.x509.certs import (
    EKU_OIDS,
    KeyType,
    PrivateKey,
    authority_key_id,
    crl_blocks,
    crl_number,
    extended_key_usages,
    is_ca,
    key_id,
    key_type,
    load_certificates,
    load_crl,
    load_crls,
    load_key,
    normalise_thumbprint,
    parse_certificates,
    parse_crl,
    parse_key,
    subject_alt_names,
    thumbprint,
)
from shared.x509.files import MaterialError, read_protected
from shared.x509.identity import PeerIdentity, own_id, peer_id
from shared.x509.spiffe import MAX_LENGTH, InvalidSpiffeId, InvalidSvid, SpiffeId, svid_id

__all__ = [
    "EKU_OIDS",
    "MAX_LENGTH",
    "InvalidSpiffeId",
    "InvalidSvid",
    "KeyType",
    "MaterialError",
    "PeerIdentity",
    "PrivateKey",
    "SpiffeId",
    "authority_key_id",
    "crl_blocks",
    "crl_number",
    "extended_key_usages",
    "is_ca",
    "key_id",
    "key_type",
    "load_certificates",
    "load_crl",
    "load_crls",
    "load_key",
    "normalise_thumbprint",
    "own_id",
    "parse_certificates",
    "parse_crl",
    "parse_key",
    "peer_id",
    "read_protected",
    "subject_alt_names",
    "svid_id",
    "thumbprint",
]
