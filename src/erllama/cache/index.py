"""A prefix index over saved token lists: which rows are prefixes of a prompt, and which row
shares the longest common prefix with it?

A compressed radix trie per namespace. Edges are labelled with runs of tokens kept as their
u32 LE bytes (``encode_tokens``), so walking an edge is one ``bytes.startswith`` (a memcmp in
C) rather than a Python loop over tokens. A lookup therefore costs time proportional to the
prompt (plus one step per row found on the path), not to the number of rows: see
bench/bench_prefix_index.py.

Invariants (checked by the tests through ``_check``):

- every label is a non-empty multiple of 4 bytes, except the roots' (empty);
- a child is filed under the first token (4 bytes) of its label;
- every non-root node holds a key or has at least two children (no chains to walk).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from .key import common_prefix_tokens, encode_tokens

__all__ = ["COVER_BUDGET", "PrefixIndex"]

#: Nodes a ``covering`` lookup visits at most below where the prompt leaves the trie.
COVER_BUDGET = 64


class _Node:
    __slots__ = ("children", "keys", "label")

    def __init__(self, label: bytes) -> None:
        self.label = label
        self.children: dict[bytes, _Node] = {}
        # A dict used as an insertion-ordered set: several keys may end at one node.
        self.keys: dict[bytes, None] = {}


def _as_bytes(tokens: Sequence[int] | bytes) -> bytes:
    if isinstance(tokens, bytes | bytearray | memoryview):
        data = bytes(tokens)
        if len(data) % 4:
            raise ValueError("token bytes are not a multiple of 4")
        return data
    return encode_tokens(tokens)


def _common_bytes(label: bytes, tokens: bytes, pos: int) -> int:
    """Length in bytes (a multiple of 4) of the common prefix of ``label`` and
    ``tokens[pos:]``."""
    return 4 * common_prefix_tokens(label, tokens[pos : pos + len(label)])


class PrefixIndex:
    """Rows ``(namespace id, tokens, key)``, searchable by "which are prefixes of this prompt".

    Not thread-safe: the owner (the cache manager) serialises calls. Tokens may be given as
    ids or as their ``encode_tokens`` bytes (cheaper when the caller has them already).
    """

    def __init__(self) -> None:
        self._roots: dict[bytes, _Node] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def clear(self) -> None:
        self._roots.clear()
        self._len = 0

    def insert(self, ns_id: bytes, tokens: Sequence[int] | bytes, key: bytes) -> bool:
        """Add a row; returns False if that exact row was already present."""
        t = _as_bytes(tokens)
        node = self._roots.get(ns_id)
        if node is None:
            node = self._roots[ns_id] = _Node(b"")
        pos, n = 0, len(t)
        while pos < n:
            first = t[pos : pos + 4]
            child = node.children.get(first)
            if child is None:
                leaf = _Node(t[pos:])
                node.children[first] = leaf
                node, pos = leaf, n
                break
            label = child.label
            if t.startswith(label, pos):
                node, pos = child, pos + len(label)
                continue
            # Diverges (or ends) inside the edge: split it at the common part, which is at
            # least the first token (that is how the child was found).
            common = _common_bytes(label, t, pos)
            mid = _Node(label[:common])
            child.label = label[common:]
            mid.children[child.label[:4]] = child
            node.children[first] = mid
            node, pos = mid, pos + common
        if key in node.keys:
            return False
        node.keys[key] = None
        self._len += 1
        return True

    def remove(self, ns_id: bytes, tokens: Sequence[int] | bytes, key: bytes) -> bool:
        """Remove a row; returns False if it was not present. Prunes emptied nodes."""
        root = self._roots.get(ns_id)
        if root is None:
            return False
        t = _as_bytes(tokens)
        path: list[tuple[_Node, bytes]] = []
        node, pos, n = root, 0, len(t)
        while pos < n:
            first = t[pos : pos + 4]
            child = node.children.get(first)
            if child is None or not t.startswith(child.label, pos):
                return False
            path.append((node, first))
            node, pos = child, pos + len(child.label)
        if key not in node.keys:
            return False
        del node.keys[key]
        self._len -= 1
        # Restore the invariant bottom-up: drop key-less leaves, merge key-less single-child
        # nodes into their child.
        while path and not node.keys:
            parent, first = path.pop()
            if not node.children:
                del parent.children[first]
                node = parent
                continue
            if len(node.children) == 1:
                (only,) = node.children.values()
                only.label = node.label + only.label
                parent.children[first] = only
            break
        if not root.keys and not root.children:
            del self._roots[ns_id]
        return True

    def longest(
        self,
        ns_id: bytes,
        tokens: Sequence[int] | bytes,
        max_len: int | None = None,
        *,
        longer_than: int | None = None,
        most: int | None = None,
    ) -> list[tuple[int, bytes]]:
        """Every ``(prefix_length, key)`` whose row's tokens are a prefix of ``tokens`` (the
        whole of it included), at most ``max_len`` and more than ``longer_than`` tokens long,
        deepest first, so a caller can fall back to a shorter row when the deepest one turns
        out unusable. ``most`` caps how many are returned (the deepest ones)."""
        root = self._roots.get(ns_id)
        if root is None:
            return []
        t = _as_bytes(tokens)
        limit = len(t) if max_len is None else max(0, min(len(t), 4 * max_len))
        walk = _Walk(root, t, limit)
        return walk.prefixes(longer_than, most)

    def covering(
        self, ns_id: bytes, tokens: Sequence[int] | bytes, *, budget: int = COVER_BUDGET
    ) -> tuple[int, bytes, int] | None:
        """The row sharing the longest common prefix with ``tokens`` among rows that are
        *not* a prefix of it (they run past where the prompt ends or differs):
        ``(common_length, key, row_length)``, or None when no such row shares a token.

        Every row below the point where the walk along ``tokens`` stops (inside an edge or
        at a node) shares exactly that many tokens. Of those, the shortest one seen within
        ``budget`` nodes (breadth first) is returned: restoring it reads the fewest tokens
        that will be trimmed off again. A key-less node has at least two children, so the
        first key is never far below."""
        root = self._roots.get(ns_id)
        if root is None:
            return None
        t = _as_bytes(tokens)
        return _Walk(root, t, len(t)).covering(budget)

    def search(
        self,
        ns_id: bytes,
        tokens: Sequence[int] | bytes,
        *,
        longer_than: int | None = None,
        most: int | None = None,
        budget: int = COVER_BUDGET,
    ) -> tuple[list[tuple[int, bytes]], tuple[int, bytes, int] | None]:
        """``longest(ns_id, tokens, longer_than=, most=)`` and ``covering(ns_id, tokens)``
        from one walk along the prompt (what a lookup asks for)."""
        root = self._roots.get(ns_id)
        if root is None:
            return [], None
        t = _as_bytes(tokens)
        walk = _Walk(root, t, len(t))
        return walk.prefixes(longer_than, most), walk.covering(budget)

    def nearest(
        self, ns_id: bytes, tokens: Sequence[int] | bytes, *, budget: int = COVER_BUDGET
    ) -> tuple[int, bytes, int] | None:
        """The row sharing the most leading tokens with ``tokens``, whether it is a prefix of
        them or runs past where they end or differ: ``(common_length, key, row_length)``, or
        None when no row shares a token. A prefix row wins a tie (the prompt did not leave
        it: it ended). One walk along the prompt, as for a lookup; this is what explains a
        miss (``erllama.model.explain``)."""
        root = self._roots.get(ns_id)
        if root is None:
            return None
        t = _as_bytes(tokens)
        walk = _Walk(root, t, len(t))
        deepest = walk.prefixes(None, 1)
        cover = walk.covering(budget)
        best = (deepest[0][0], deepest[0][1], deepest[0][0]) if deepest else None
        if cover is not None and (best is None or cover[0] > best[0]):
            best = cover
        if best is None or best[0] == 0:
            return None
        return best

    def namespaces(self) -> list[bytes]:
        """The namespace ids holding at least one row."""
        return list(self._roots)

    def _check(self) -> None:
        """Assert the structural invariants (for tests)."""
        count = 0
        for root in self._roots.values():
            assert root.label == b""
            assert root.keys or root.children, "empty partition kept"
            stack = [(root, True)]
            while stack:
                node, is_root = stack.pop()
                count += len(node.keys)
                if not is_root:
                    assert node.label and len(node.label) % 4 == 0
                    assert node.keys or len(node.children) >= 2, "uncompressed node"
                for first, child in node.children.items():
                    assert child.label[:4] == first
                    stack.append((child, False))
        assert count == self._len


class _Walk:
    """One walk down the trie along the prompt ``t`` (at most ``limit`` bytes of it): the
    nodes holding keys on the way (rows that are prefixes of the prompt), and where it
    stopped, from which :meth:`covering` finds what rows running past the prompt share
    with it (computed only when asked: ``longest`` alone does not pay for it)."""

    __slots__ = ("_branch", "_child", "_node", "_pos", "_t", "on_path")

    def __init__(self, root: _Node, t: bytes, limit: int) -> None:
        #: (byte depth, node) for every node on the path that holds keys.
        self.on_path: list[tuple[int, _Node]] = [(0, root)] if root.keys else []
        node, pos = root, 0
        # The deepest node passed that has children off the path, as (depth, node, the
        # child followed): the fallback when the walk ends on a leaf (then that leaf is a
        # prefix row, which a caller prefers anyway).
        branch: tuple[int, _Node, _Node] | None = None
        while True:
            child = node.children.get(t[pos : pos + 4]) if pos < limit else None
            if child is None:
                break
            end = pos + len(child.label)
            if end > limit or not t.startswith(child.label, pos):
                break  # stopped inside the edge to ``child``
            if len(node.children) > 1:
                branch = (pos, node, child)
            node, pos = child, end
            if node.keys:
                self.on_path.append((pos, node))
        self._t, self._node, self._pos, self._child, self._branch = t, node, pos, child, branch

    def prefixes(self, longer_than: int | None, most: int | None) -> list[tuple[int, bytes]]:
        floor = -1 if longer_than is None else 4 * longer_than
        found = [
            (depth >> 2, k)
            for depth, n in reversed(self.on_path)
            if depth > floor
            for k in reversed(n.keys)
        ]
        return found if most is None else found[:most]

    def _below(self) -> tuple[int, list[tuple[int, _Node]]]:
        """Bytes that the rows below the stop share with the prompt, and (byte depth of the
        node's end, node) for the subtrees holding them."""
        pos, child = self._pos, self._child
        if child is not None:  # inside the edge: every row below ``child`` shares this much
            common = pos + _common_bytes(child.label, self._t, pos)
            return common, [(pos + len(child.label), child)]
        # At a node: rows in its children's subtrees share ``pos`` bytes.
        below = [(pos + len(c.label), c) for c in self._node.children.values()]
        if below or self._branch is None:
            return pos, below
        depth, at, followed = self._branch
        return depth, [(depth + len(c.label), c) for c in at.children.values() if c is not followed]

    def covering(self, budget: int) -> tuple[int, bytes, int] | None:
        common, below = self._below()
        if common == 0:
            return None
        best: tuple[int, bytes] | None = None
        queue = deque(below)
        seen = 0
        while queue and seen < budget:
            depth, at = queue.popleft()
            seen += 1
            if at.keys and (best is None or depth < best[0]):
                best = (depth, next(iter(at.keys)))
            if best is not None and depth >= best[0]:
                continue  # nothing deeper beats it
            queue.extend((depth + len(c.label), c) for c in at.children.values())
        if best is None:
            return None
        return common >> 2, best[1], best[0] >> 2
