namespace QcowTier.Engine;

/// <summary>
/// A bounded cache of cluster-sized metadata tables (L2 tables or refcount blocks), keyed by host
/// offset. Dirty tables are written back through <see cref="_writeBack"/>, which owns the ordering
/// (an L2 table may only reach the disk after the refcounts it depends on).
/// The owner serializes all access (the image's metadata lock).
/// </summary>
internal sealed class MetadataCache
{
    internal sealed class Entry
    {
        public required byte[] Data;
        public bool Dirty;
        public long LastUse;
    }

    private readonly Dictionary<long, Entry> _entries;
    private readonly int _capacity;
    private readonly Action<long, byte[]> _writeBack;
    private long _clock;

    public MetadataCache(int capacity, Action<long, byte[]> writeBack)
    {
        _capacity = Math.Max(2, capacity);
        _entries = new Dictionary<long, Entry>(Math.Min(_capacity, 4096));
        _writeBack = writeBack;
    }

    public int Capacity => _capacity;

    public int Count => _entries.Count;

    public byte[]? TryGet(long offset)
    {
        if (_entries.TryGetValue(offset, out var e))
        {
            e.LastUse = ++_clock;
            return e.Data;
        }
        return null;
    }

    public void Add(long offset, byte[] data, bool dirty)
    {
        if (_entries.Count >= _capacity)
        {
            EvictOne();
        }
        _entries[offset] = new Entry { Data = data, Dirty = dirty, LastUse = ++_clock };
    }

    public void MarkDirty(long offset)
    {
        _entries[offset].Dirty = true;
    }

    public bool HasDirty
    {
        get
        {
            foreach (var e in _entries.Values)
            {
                if (e.Dirty)
                {
                    return true;
                }
            }
            return false;
        }
    }

    /// <summary>Writes every dirty table, lowest offset first so the writes run forward on disk.</summary>
    public int WriteAllDirty()
    {
        List<long>? dirty = null;
        foreach (var (off, e) in _entries)
        {
            if (e.Dirty)
            {
                (dirty ??= []).Add(off);
            }
        }
        if (dirty is null)
        {
            return 0;
        }
        dirty.Sort();
        foreach (var off in dirty)
        {
            var e = _entries[off];
            _writeBack(off, e.Data);
            e.Dirty = false;
        }
        return dirty.Count;
    }

    public void Remove(long offset) => _entries.Remove(offset);

    public void Clear() => _entries.Clear();

    private void EvictOne()
    {
        // Prefer the least recently used clean table; a dirty one costs a write-back.
        long victim = -1, victimUse = long.MaxValue;
        long dirtyVictim = -1, dirtyUse = long.MaxValue;
        foreach (var (off, e) in _entries)
        {
            if (!e.Dirty)
            {
                if (e.LastUse < victimUse)
                {
                    victim = off;
                    victimUse = e.LastUse;
                }
            }
            else if (e.LastUse < dirtyUse)
            {
                dirtyVictim = off;
                dirtyUse = e.LastUse;
            }
        }
        if (victim < 0)
        {
            victim = dirtyVictim;
            var e = _entries[victim];
            _writeBack(victim, e.Data);
        }
        _entries.Remove(victim);
    }
}
