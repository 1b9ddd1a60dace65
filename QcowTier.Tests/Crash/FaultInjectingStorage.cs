using QcowTier.Storage;

namespace QcowTier.Tests.Crash;

/// <summary>
/// Storage that models a disk with a volatile write cache. It keeps the durable bytes (what survives a
/// power cut) and the writes (and length changes) issued since the last flush. Power can be cut at the
/// N-th write: that write and everything after it throws. A crash image is then the durable bytes plus
/// any subset of the unflushed writes, applied in any order, optionally torn into 512-byte sectors,
/// since a disk may persist, drop and reorder whatever it has not been told to flush.
/// </summary>
internal sealed class FaultInjectingStorage : ImageStorage
{
    private const int Sector = 512;

    private readonly object _gate = new();
    private readonly List<Pending> _pending = [];
    private byte[] _current;   // what reads see
    private long _currentLength;
    private byte[] _durable;
    private long _durableLength;
    private long _writes;
    private long _cutAt = long.MaxValue;

    /// <summary>One unflushed change: a write (Data non-null) or a length change.</summary>
    public sealed record Pending(long Offset, byte[]? Data, long NewLength);

    public FaultInjectingStorage(byte[]? initial = null, string? name = null)
    {
        _current = initial is null ? new byte[1 << 16] : (byte[])initial.Clone();
        _currentLength = initial?.LongLength ?? 0;
        _durable = (byte[])_current.Clone();
        _durableLength = _currentLength;
        Name = name;
    }

    public override string? Name { get; }

    public override long Length
    {
        get
        {
            lock (_gate)
            {
                return _currentLength;
            }
        }
    }

    public override bool CanWrite => true;

    /// <summary>Writes so far (each Write call and each SetLength counts as one).</summary>
    public long WriteCount
    {
        get
        {
            lock (_gate)
            {
                return _writes;
            }
        }
    }

    public long FlushCount { get; private set; }

    /// <summary>Whether the power has been cut.</summary>
    public bool IsCut
    {
        get
        {
            lock (_gate)
            {
                return _writes >= _cutAt;
            }
        }
    }

    /// <summary>Cuts the power at the <paramref name="n"/>-th write from now (1 = the very next write fails).</summary>
    public void CutAtWrite(long n)
    {
        lock (_gate)
        {
            _cutAt = n >= long.MaxValue - _writes ? long.MaxValue : _writes + n - 1;
        }
    }

    /// <summary>Forgets the fault (for setting up an image before the cut is armed).</summary>
    public void Disarm()
    {
        lock (_gate)
        {
            _cutAt = long.MaxValue;
        }
    }

    public IReadOnlyList<Pending> PendingWrites
    {
        get
        {
            lock (_gate)
            {
                return [.. _pending];
            }
        }
    }

    private void CountWrite()
    {
        if (_writes >= _cutAt)
        {
            throw new IOException("simulated power cut: the device is gone");
        }
        _writes++;
        if (_writes > _cutAt)
        {
            throw new IOException("simulated power cut during this write");
        }
    }

    public override void Read(long offset, Span<byte> buffer)
    {
        lock (_gate)
        {
            var avail = (int)Math.Clamp(_currentLength - offset, 0, buffer.Length);
            _current.AsSpan((int)offset, avail).CopyTo(buffer);
            buffer[avail..].Clear();
        }
    }

    public override void Write(long offset, ReadOnlySpan<byte> data)
    {
        lock (_gate)
        {
            CountWrite();
            var copy = data.ToArray();
            Apply(ref _current, ref _currentLength, new Pending(offset, copy, 0));
            _pending.Add(new Pending(offset, copy, 0));
        }
    }

    public override void SetLength(long length)
    {
        lock (_gate)
        {
            CountWrite();
            Apply(ref _current, ref _currentLength, new Pending(0, null, length));
            _pending.Add(new Pending(0, null, length));
        }
    }

    /// <summary>A punched hole reads as zeroes; like any write it may or may not survive a cut until flushed.</summary>
    public override void Reclaim(long offset, long length)
    {
        lock (_gate)
        {
            var end = Math.Min(offset + length, _currentLength);
            if (end <= offset)
            {
                return;
            }
            CountWrite();
            var zeroes = new byte[end - offset];
            Apply(ref _current, ref _currentLength, new Pending(offset, zeroes, 0));
            _pending.Add(new Pending(offset, zeroes, 0));
        }
    }

    public override void Flush()
    {
        lock (_gate)
        {
            if (_writes >= _cutAt)
            {
                throw new IOException("simulated power cut: flush failed");
            }
            foreach (var p in _pending)
            {
                Apply(ref _durable, ref _durableLength, p);
            }
            _pending.Clear();
            FlushCount++;
        }
    }

    private static void Apply(ref byte[] bytes, ref long length, Pending p, bool reordered = false)
    {
        if (p.Data is null && reordered && p.NewLength < length)
        {
            // An extension persisted after later writes beyond it cannot shrink the file.
            return;
        }
        if (p.Data is null)
        {
            Ensure(ref bytes, p.NewLength);
            if (p.NewLength < length)
            {
                bytes.AsSpan((int)p.NewLength, (int)(length - p.NewLength)).Clear();
            }
            length = p.NewLength;
            return;
        }
        var end = p.Offset + p.Data.Length;
        Ensure(ref bytes, end);
        if (p.Offset > length)
        {
            bytes.AsSpan((int)length, (int)(p.Offset - length)).Clear();
        }
        p.Data.CopyTo(bytes.AsSpan((int)p.Offset));
        length = Math.Max(length, end);
    }

    private static void Ensure(ref byte[] bytes, long length)
    {
        if (length > bytes.LongLength)
        {
            Array.Resize(ref bytes, (int)Math.Max(length, Math.Min(bytes.LongLength * 2, int.MaxValue / 2)));
        }
    }

    /// <summary>The durable bytes alone: every unflushed write lost.</summary>
    public byte[] DurableImage()
    {
        lock (_gate)
        {
            return _durable.AsSpan(0, (int)_durableLength).ToArray();
        }
    }

    /// <summary>
    /// The durable bytes plus a random subset of the unflushed writes in a random order; with
    /// <paramref name="tear"/>, each write is first split into its 512-byte sectors, which survive independently.
    /// </summary>
    public byte[] CrashImage(Random rng, double keepProbability = 0.5, bool tear = false)
    {
        lock (_gate)
        {
            var pieces = new List<Pending>();
            foreach (var p in _pending)
            {
                if (p.Data is null || !tear)
                {
                    pieces.Add(p);
                    continue;
                }
                var pos = p.Offset;
                var end = p.Offset + p.Data.Length;
                while (pos < end)
                {
                    var next = Math.Min(end, (pos / Sector + 1) * Sector);
                    pieces.Add(new Pending(pos, p.Data.AsSpan((int)(pos - p.Offset), (int)(next - pos)).ToArray(), 0));
                    pos = next;
                }
            }
            var kept = pieces.Where(_ => rng.NextDouble() < keepProbability).ToList();
            // Fisher-Yates: the disk persists in any order.
            for (var i = kept.Count - 1; i > 0; i--)
            {
                var j = rng.Next(i + 1);
                (kept[i], kept[j]) = (kept[j], kept[i]);
            }
            var bytes = (byte[])_durable.Clone();
            var length = _durableLength;
            foreach (var p in kept)
            {
                Apply(ref bytes, ref length, p, reordered: true);
            }
            return bytes.AsSpan(0, (int)length).ToArray();
        }
    }

    /// <summary>Everything written so far, as if flushed (the state without a crash).</summary>
    public byte[] CurrentImage()
    {
        lock (_gate)
        {
            return _current.AsSpan(0, (int)_currentLength).ToArray();
        }
    }
}
