using System.Buffers.Binary;
using System.Runtime.InteropServices;
using QcowTier.Check;
using QcowTier.Format;

namespace QcowTier.Engine;

/// <summary>
/// Persistent dirty bitmaps (extension 0x23852875), kept as QEMU keeps them. On a writable open every
/// consistent bitmap is loaded; before the first guest write (or zeroing, discard, snapshot apply) the
/// enabled ones (AUTO flag) are marked IN_USE on disk and flushed; every written range then sets its
/// bits in memory; a clean close writes the bitmaps to new clusters, a new directory, switches the
/// extension's directory pointer with one write, and frees the old clusters last. A power cut leaves
/// the bitmaps IN_USE — inconsistent, never wrong and trusted. Disabled bitmaps are not touched
/// (except that a resize resizes them, as QEMU does); read-only opens change nothing.
/// </summary>
internal sealed partial class QcowCore
{
    private sealed class LoadedBitmap
    {
        public required BitmapDirectoryEntry Entry;
        public ulong[] Bits = [];
        public long BitCount;
        public bool Consistent;   // not IN_USE when the image was opened: its bits can be trusted
        public bool Tracking;     // consistent and AUTO: every write sets bits
        public bool MarkedInUse;  // IN_USE made durable by us this session; it must be stored at close
        public bool Rewrite;      // new or cleared: its data must be written at the next commit
    }

    private List<LoadedBitmap>? _bitmaps;         // writable opens with a usable bitmaps extension
    private BitmapsExtension? _bitmapsExtension;

    /// <summary>File offset of the extension's data, or -1: found by type each time, since other features rewrite the extension area.</summary>
    private long BitmapsExtData => Header.Extensions.FirstOrDefault(x => x.Type == HeaderExtension.Bitmaps) is { } e ? e.Offset + 8 : -1;
    private volatile bool _trackingInUse;         // every tracking bitmap is IN_USE on disk

    /// <summary>
    /// Part of a writable open: keeps autoclear bit 0 when the bitmaps can be maintained (and loads
    /// them), clears every other autoclear bit (structures we do not maintain become stale for readers).
    /// </summary>
    private void PrepareAutoclearBits()
    {
        if (Header.Version < 3)
        {
            return;
        }
        var keep = _external is not null ? Header.AutoclearFeatures & QcowHeader.AutoclearDataFileRaw : 0;
        var ext = BitmapDirectory.Find(Header, out var error);
        // The checker's parser applies QEMU's rules to every entry (type, granularity, table size, flags).
        if (ext is not null && error is null && BitmapDirectory.Load(File, Header, ext) is not null)
        {
            try
            {
                LoadBitmaps(ext);
                keep |= QcowHeader.AutoclearBitmaps;
            }
            catch (QcowFormatException)
            {
                // A directory we cannot use is left for QEMU to judge; clearing the bit tells it the
                // bitmaps are stale, as before bitmaps were maintained here.
                _bitmaps = null;
            }
        }
        if ((Header.AutoclearFeatures & ~keep) != 0)
        {
            Header.AutoclearFeatures &= keep;
            WriteHeaderU64(QcowHeader.OffsetAutoclearFeatures, Header.AutoclearFeatures);
            File.Flush();
        }
    }

    private void LoadBitmaps(BitmapsExtension ext)
    {
        var entries = BitmapDirectoryEntry.Read(File, ext);
        var list = new List<LoadedBitmap>();
        foreach (var e in entries)
        {
            var b = new LoadedBitmap { Entry = e, Consistent = !e.InUse };
            if (b.Consistent)
            {
                b.BitCount = QcowHeader.CeilDiv(_size, e.Granularity);
                b.Bits = LoadBitmapBits(e, b.BitCount);
                b.Tracking = e.Auto;
            }
            list.Add(b);
        }
        _bitmapsExtension = ext;
        _bitmaps = list;
    }

    private ulong[] LoadBitmapBits(BitmapDirectoryEntry e, long bitCount)
    {
        var words = new ulong[QcowHeader.CeilDiv(bitCount, 64)];
        var bytes = MemoryMarshal.AsBytes(words.AsSpan());
        var perCluster = _clusterSize;
        var needed = QcowHeader.CeilDiv(bytes.Length, perCluster);
        if (e.TableSize < needed || e.TableOffset <= 0 || e.TableOffset + e.TableSize * 8L > File.Length)
        {
            ThrowHelper.Corrupt(Name, e.TableOffset, "bitmap_table_offset", $"bitmap '{e.Name}': table of {e.TableSize} entries at 0x{e.TableOffset:x} cannot cover the disk or lies past the end of the file");
        }
        var table = new byte[e.TableSize * 8L];
        File.Read(e.TableOffset, table);
        for (var i = 0; i < needed; i++)
        {
            var entry = BinaryPrimitives.ReadUInt64BigEndian(table.AsSpan(i * 8));
            var chunk = bytes.Slice(i * perCluster, Math.Min(perCluster, bytes.Length - i * perCluster));
            var off = (long)(entry & BitmapDirectoryEntry.TableOffsetMask);
            if (off == 0)
            {
                chunk.Fill((entry & BitmapDirectoryEntry.TableAllOnes) != 0 ? (byte)0xff : (byte)0);
            }
            else
            {
                if (off + chunk.Length > File.Length)
                {
                    ThrowHelper.Corrupt(Name, e.TableOffset + i * 8L, "bitmap table entry", $"bitmap '{e.Name}': data cluster 0x{off:x} lies past the end of the file");
                }
                File.Read(off, chunk);
            }
        }
        // Stored little-endian, bit i of the disk in bit i % 8 of byte i / 8: on a little-endian host the words are the bytes.
        if (!BitConverter.IsLittleEndian)
        {
            BinaryPrimitives.ReverseEndianness(words, words);
        }
        // Bits past the disk's end (from an all-ones cluster) are not dirty.
        var tail = bitCount & 63;
        if (tail != 0)
        {
            words[^1] &= (1UL << (int)tail) - 1;
        }
        return words;
    }

    /// <summary>Called before every guest change of [offset, offset+length): marks the tracking bitmaps.</summary>
    private void TrackWrite(long offset, long length)
    {
        var bitmaps = _bitmaps;
        if (bitmaps is null || length <= 0)
        {
            return;
        }
        if (!_trackingInUse)
        {
            MarkTrackingInUse(bitmaps);
        }
        foreach (var b in bitmaps)
        {
            if (!b.Tracking)
            {
                continue;
            }
            var first = offset >> b.Entry.GranularityBits;
            var last = Math.Min((offset + length - 1) >> b.Entry.GranularityBits, b.BitCount - 1);
            lock (b)
            {
                SetBits(b.Bits, first, last);
            }
        }
    }

    private static void SetBits(ulong[] words, long first, long last)
    {
        for (var bit = first; bit <= last;)
        {
            var w = (int)(bit >> 6);
            var lo = (int)(bit & 63);
            var hi = (int)Math.Min(63, last - ((long)w << 6));
            var mask = (hi == 63 ? ulong.MaxValue : (1UL << (hi + 1)) - 1) & ~((1UL << lo) - 1);
            words[w] |= mask;
            bit = ((long)w + 1) << 6;
        }
    }

    private void MarkTrackingInUse(List<LoadedBitmap> bitmaps)
    {
        lock (_lock)
        {
            if (_trackingInUse)
            {
                return;
            }
            MarkInUse(bitmaps.Where(b => b.Tracking));
            _trackingInUse = true;
        }
    }

    /// <summary>Sets IN_USE in place (one 4-byte write per entry, as QEMU's in-place directory update), then flushes.</summary>
    private void MarkInUse(IEnumerable<LoadedBitmap> which)
    {
        var wrote = false;
        Span<byte> flags = stackalloc byte[4];
        foreach (var b in which)
        {
            if (b.MarkedInUse)
            {
                continue;
            }
            b.Entry.Flags |= BitmapDirectoryEntry.FlagInUse;
            BinaryPrimitives.WriteUInt32BigEndian(flags, b.Entry.Flags);
            File.Write((long)_bitmapsExtension!.DirectoryOffset + BitmapDirectoryEntry.FlagsPosition(b.Entry), flags);
            b.MarkedInUse = true;
            wrote = true;
        }
        if (wrote)
        {
            File.Flush();
        }
    }

    /// <summary>A resize resizes every consistent bitmap (new bits clean), marked IN_USE first (lock held).</summary>
    private void ResizeBitmaps(long newSize)
    {
        if (_bitmaps is null)
        {
            return;
        }
        MarkInUse(_bitmaps.Where(b => b.Consistent));
        foreach (var b in _bitmaps.Where(b => b.Consistent))
        {
            lock (b)
            {
                var count = QcowHeader.CeilDiv(newSize, b.Entry.Granularity);
                var words = new ulong[QcowHeader.CeilDiv(count, 64)];
                Array.Copy(b.Bits, words, Math.Min(b.Bits.Length, words.Length));
                if ((count & 63) != 0)
                {
                    words[^1] &= (1UL << (int)(count & 63)) - 1;
                }
                b.Bits = words;
                b.BitCount = count;
            }
        }
    }

    /// <summary>
    /// At a clean close (lock held, everything else flushed): every bitmap we marked IN_USE is written to
    /// new clusters with a new table; a new directory without those IN_USE flags; flush; the extension's
    /// directory pointer switched in one write; flush; the old clusters freed.
    /// </summary>
    private void StoreBitmaps() => CommitBitmaps([], force: false);

    /// <summary>
    /// Writes what changed (bitmaps marked IN_USE, new or cleared ones) to new clusters, a new directory,
    /// switches the extension to it (adding or removing the extension as the count requires), then frees
    /// the old clusters and those of <paramref name="removed"/> bitmaps. Lock held, everything else flushed.
    /// </summary>
    private void CommitBitmaps(List<BitmapDirectoryEntry> removed, bool force)
    {
        if (_bitmaps is null || !force && !_bitmaps.Any(b => b.MarkedInUse || b.Rewrite))
        {
            return;
        }
        var toFree = new List<(long Offset, int Clusters)>();
        foreach (var r in removed)
        {
            toFree.AddRange(BitmapClusters(r));
        }
        foreach (var b in _bitmaps.Where(b => b.MarkedInUse || b.Rewrite))
        {
            toFree.AddRange(BitmapClusters(b.Entry));
            var words = b.Bits;
            if (!BitConverter.IsLittleEndian)
            {
                words = (ulong[])words.Clone();
                BinaryPrimitives.ReverseEndianness(words, words);
            }
            var bytes = MemoryMarshal.AsBytes(words.AsSpan());
            var tableSize = (int)Math.Max(1, QcowHeader.CeilDiv(QcowHeader.CeilDiv(b.BitCount, 8), _clusterSize));
            var table = new byte[(long)L1Clusters(tableSize) * _clusterSize];
            var cluster = new byte[_clusterSize];
            for (var i = 0; i < tableSize; i++)
            {
                var start = (long)i * _clusterSize;
                var chunk = start < bytes.Length ? bytes.Slice((int)start, (int)Math.Min(_clusterSize, bytes.Length - start)) : [];
                if (chunk.IndexOfAnyExcept((byte)0) < 0)
                {
                    continue; // an all-zero cluster is table entry 0
                }
                cluster.AsSpan().Clear();
                chunk.CopyTo(cluster);
                var off = _refcounts.Allocate(1, out _);
                File.Write(off, cluster);
                BinaryPrimitives.WriteUInt64BigEndian(table.AsSpan(i * 8), (ulong)off);
            }
            var tableOff = _refcounts.Allocate(L1Clusters(tableSize), out _);
            File.Write(tableOff, table);
            b.Entry.TableOffset = tableOff;
            b.Entry.TableSize = (uint)tableSize;
            b.Entry.Flags &= ~BitmapDirectoryEntry.FlagInUse;
        }
        var entries = _bitmaps.Select(b => b.Entry).ToList();
        if (_bitmapsExtension is not null)
        {
            toFree.Add(((long)_bitmapsExtension.DirectoryOffset, (int)QcowHeader.CeilDiv((long)_bitmapsExtension.DirectorySize, _clusterSize)));
        }
        if (entries.Count == 0)
        {
            // No bitmaps: no extension (QEMU refuses one with zero bitmaps). The bit goes first, so a cut
            // in between leaves an extension QEMU ignores.
            _refcounts.WriteBack();
            File.Flush();
            if (_bitmapsExtension is not null)
            {
                Header.AutoclearFeatures &= ~QcowHeader.AutoclearBitmaps;
                WriteHeaderU64(QcowHeader.OffsetAutoclearFeatures, Header.AutoclearFeatures);
                File.Flush();
                RewriteExtensions(Header.Extensions.Where(e => e.Type != HeaderExtension.Bitmaps).ToList());
            }
            _bitmapsExtension = null;
        }
        else
        {
            var dir = BitmapDirectoryEntry.Serialize(entries);
            var dirClusters = (int)QcowHeader.CeilDiv(dir.Length, _clusterSize);
            var dirOff = _refcounts.Allocate(dirClusters, out _);
            var padded = new byte[(long)dirClusters * _clusterSize];
            dir.CopyTo(padded, 0);
            File.Write(dirOff, padded);
            _refcounts.WriteBack();
            File.Flush();
            var extData = BitmapDirectoryEntry.ExtensionData(entries.Count, dirOff, dir.Length);
            if (BitmapsExtData < 0 || (Header.AutoclearFeatures & QcowHeader.AutoclearBitmaps) == 0)
            {
                // A new extension, then the autoclear bit that makes QEMU trust it.
                var list = Header.Extensions.Where(e => e.Type != HeaderExtension.Bitmaps).ToList();
                list.Add(new HeaderExtension(HeaderExtension.Bitmaps, extData, 0));
                if (!ExtensionsFit(list))
                {
                    throw new QcowException($"{Name ?? "image"}: no room in the header cluster for the bitmaps extension");
                }
                RewriteExtensions(list);
                Header.AutoclearFeatures |= QcowHeader.AutoclearBitmaps;
                WriteHeaderU64(QcowHeader.OffsetAutoclearFeatures, Header.AutoclearFeatures);
            }
            else
            {
                var at = Header.Extensions.FindIndex(e => e.Type == HeaderExtension.Bitmaps);
                File.Write(Header.Extensions[at].Offset + 8, extData);
                // Whoever rewrites the extension area later must write this pointer, not the one read at open.
                Header.Extensions[at] = Header.Extensions[at] with { Data = extData };
            }
            File.Flush();
            _bitmapsExtension = new BitmapsExtension((uint)entries.Count, (ulong)dirOff, (ulong)dir.Length);
        }
        foreach (var (offset, clusters) in toFree)
        {
            _refcounts.FreeNow(offset, clusters);
        }
        _refcounts.WriteBack();
        File.Flush();
        foreach (var b in _bitmaps)
        {
            b.MarkedInUse = false;
            b.Rewrite = false;
        }
        _trackingInUse = false;
    }

    // ---------------------------------------------------------------- qemu-img bitmap

    /// <summary>qemu-img bitmap --add: a new, clean bitmap (enabled unless told otherwise).</summary>
    public void AddBitmap(string name, long granularity, bool enabled)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        if (granularity < 512 || granularity > 1L << 31 || (granularity & (granularity - 1)) != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(granularity), "Granularity must be power of 2 between 512 and 2147483648");
        }
        if (System.Text.Encoding.UTF8.GetByteCount(name) > 1023)
        {
            throw new ArgumentException("the bitmap name is longer than 1023 bytes", nameof(name));
        }
        EditBitmaps(list =>
        {
            if (list.Any(b => b.Entry.Name == name))
            {
                throw new ArgumentException($"{Name ?? "image"}: a bitmap named '{name}' already exists", nameof(name));
            }
            if (list.Count >= BitmapDirectory.MaxBitmaps)
            {
                throw new InvalidOperationException($"{Name ?? "image"}: the image already has the maximum of {BitmapDirectory.MaxBitmaps} bitmaps");
            }
            var bits = System.Numerics.BitOperations.Log2((ulong)granularity);
            var count = QcowHeader.CeilDiv(_size, granularity);
            list.Add(new LoadedBitmap
            {
                Entry = new BitmapDirectoryEntry { Name = name, GranularityBits = bits, Flags = enabled ? BitmapDirectoryEntry.FlagAuto : 0 },
                Bits = new ulong[QcowHeader.CeilDiv(count, 64)],
                BitCount = count,
                Consistent = true,
                Tracking = enabled,
                Rewrite = true,
            });
            return [];
        });
    }

    /// <summary>qemu-img bitmap --remove.</summary>
    public void RemoveBitmap(string name) => EditBitmaps(list =>
    {
        var b = FindLoaded(list, name);
        list.Remove(b);
        return [b.Entry];
    });

    /// <summary>qemu-img bitmap --clear: every bit clean (an inconsistent bitmap becomes consistent).</summary>
    public void ClearBitmap(string name) => EditBitmaps(list =>
    {
        var b = FindLoaded(list, name);
        b.BitCount = QcowHeader.CeilDiv(_size, b.Entry.Granularity);
        b.Bits = new ulong[QcowHeader.CeilDiv(b.BitCount, 64)];
        b.Consistent = true;
        b.Tracking = b.Entry.Auto;
        b.Rewrite = true;
        return [];
    });

    /// <summary>qemu-img bitmap --enable / --disable: the AUTO flag.</summary>
    public void SetBitmapEnabled(string name, bool enabled) => EditBitmaps(list =>
    {
        var b = FindLoaded(list, name);
        b.Entry.Flags = enabled ? b.Entry.Flags | BitmapDirectoryEntry.FlagAuto : b.Entry.Flags & ~BitmapDirectoryEntry.FlagAuto;
        b.Tracking = enabled && b.Consistent;
        return [];
    });

    /// <summary>qemu-img bitmap --merge: every range dirty in <paramref name="source"/> becomes dirty in <paramref name="target"/>.</summary>
    public void MergeBitmap(string target, string source) => EditBitmaps(list =>
    {
        var t = FindLoaded(list, target);
        var src = FindLoaded(list, source);
        if (!t.Consistent || !src.Consistent)
        {
            ThrowInconsistent(!t.Consistent ? t.Entry : src.Entry);
        }
        foreach (var (offset, length) in BitmapDirtyRanges(source))
        {
            SetBits(t.Bits, offset >> t.Entry.GranularityBits, Math.Min((offset + length - 1) >> t.Entry.GranularityBits, t.BitCount - 1));
        }
        t.Rewrite = true;
        return [];
    });

    /// <summary>qemu-img bitmap --merge -b: ranges dirty in another image's bitmap become dirty in <paramref name="target"/>.</summary>
    public void MarkBitmapDirty(string target, IReadOnlyList<(long Offset, long Length)> ranges) => EditBitmaps(list =>
    {
        var t = FindLoaded(list, target);
        if (!t.Consistent)
        {
            ThrowInconsistent(t.Entry);
        }
        var bits = t.Entry.GranularityBits;
        foreach (var (offset, length) in ranges)
        {
            if (length <= 0 || offset < 0 || offset >= Size)
            {
                continue; // past this disk's end: nothing of it to mark
            }
            var end = Math.Min(offset + length, Size);
            SetBits(t.Bits, offset >> bits, Math.Min((end - 1) >> bits, t.BitCount - 1));
        }
        t.Rewrite = true;
        return [];
    });

    private LoadedBitmap FindLoaded(List<LoadedBitmap> list, string name)
        => list.FirstOrDefault(b => b.Entry.Name == name) ?? throw new ArgumentException($"{Name ?? "image"}: no bitmap named '{name}'", nameof(name));

    /// <summary>Edits the bitmap list under the lock with no write in flight, and commits it at once.</summary>
    private void EditBitmaps(Func<List<LoadedBitmap>, List<BitmapDirectoryEntry>> edit)
    {
        CheckWritable();
        if (Header.Version < 3)
        {
            ThrowHelper.Unsupported(Name, QcowHeader.OffsetVersion, "version", "persistent bitmaps need a version 3 image (compat=1.1)");
        }
        Exclusive(() =>
        {
            if (_bitmaps is null && (Header.AutoclearFeatures & QcowHeader.AutoclearBitmaps) == 0)
            {
                // A stale extension (autoclear bit clear) describes nothing: start over without it.
                _bitmaps = [];
            }
            if (_bitmaps is null)
            {
                throw new QcowFormatException($"{Name ?? "image"}: the bitmap directory cannot be used", Name, QcowHeader.OffsetAutoclearFeatures, "bitmaps extension");
            }
            FlushLocked();
            var removed = edit(_bitmaps);
            CommitBitmaps(removed, force: true);
        });
    }

    /// <summary>The clusters a stored bitmap occupies: its table and its data clusters.</summary>
    private List<(long Offset, int Clusters)> BitmapClusters(BitmapDirectoryEntry e)
    {
        var list = new List<(long, int)>();
        if (e.TableOffset == 0 || e.TableSize == 0)
        {
            return list;
        }
        var table = new byte[e.TableSize * 8L];
        File.Read(e.TableOffset, table);
        for (var i = 0; i < e.TableSize; i++)
        {
            var off = (long)(BinaryPrimitives.ReadUInt64BigEndian(table.AsSpan(i * 8)) & BitmapDirectoryEntry.TableOffsetMask);
            if (off != 0)
            {
                list.Add((off, 1));
            }
        }
        list.Add((e.TableOffset, L1Clusters(e.TableSize)));
        return list;
    }

    /// <summary>For the overlap check (QEMU's bitmap-directory check).</summary>
    private bool IsBitmapDirectory(long clusterOffset)
    {
        var ext = _bitmapsExtension;
        return ext is not null && Overlaps(clusterOffset, _clusterSize, (long)ext.DirectoryOffset, (long)ext.DirectorySize);
    }

    // ---------------------------------------------------------------- queries

    /// <summary>The bitmaps as stored (read-only opens) or as maintained (writable opens): entry and whether its bits can be trusted.</summary>
    public List<(BitmapDirectoryEntry Entry, bool Consistent)> ReadBitmaps()
    {
        lock (_lock)
        {
            if (_bitmaps is not null)
            {
                return _bitmaps.Select(b => (b.Entry, b.Consistent)).ToList();
            }
            var ext = BitmapDirectory.Find(Header, out var error);
            if (ext is null || error is not null)
            {
                return [];
            }
            return BitmapDirectoryEntry.Read(File, ext).Select(e => (e, !e.InUse)).ToList();
        }
    }

    /// <summary>The dirty ranges of a bitmap, in bytes of the disk (granularity-aligned, clipped to the size).</summary>
    public List<(long Offset, long Length)> BitmapDirtyRanges(string name)
    {
        ulong[] words;
        long granularityBits;
        long bitCount;
        lock (_lock)
        {
            var loaded = _bitmaps?.FirstOrDefault(b => b.Entry.Name == name);
            BitmapDirectoryEntry entry;
            if (loaded is not null)
            {
                entry = loaded.Entry;
                if (!loaded.Consistent)
                {
                    ThrowInconsistent(entry);
                }
                lock (loaded)
                {
                    words = (ulong[])loaded.Bits.Clone();
                    bitCount = loaded.BitCount;
                }
            }
            else
            {
                entry = ReadBitmaps().Select(x => x.Entry).FirstOrDefault(e => e.Name == name)
                    ?? throw new ArgumentException($"{Name ?? "image"}: no bitmap named '{name}'", nameof(name));
                if (entry.InUse)
                {
                    ThrowInconsistent(entry);
                }
                bitCount = QcowHeader.CeilDiv(_size, entry.Granularity);
                words = LoadBitmapBits(entry, bitCount);
            }
            granularityBits = entry.GranularityBits;
        }
        var result = new List<(long, long)>();
        for (long bit = 0; bit < bitCount;)
        {
            var w = words[bit >> 6] >> (int)(bit & 63);
            if (w == 0)
            {
                bit = ((bit >> 6) + 1) << 6;
                continue;
            }
            bit += System.Numerics.BitOperations.TrailingZeroCount(w);
            if (bit >= bitCount)
            {
                break;
            }
            var start = bit;
            while (bit < bitCount && (words[bit >> 6] & (1UL << (int)(bit & 63))) != 0)
            {
                bit++;
            }
            var from = start << (int)granularityBits;
            var to = Math.Min(bit << (int)granularityBits, _size);
            result.Add((from, to - from));
        }
        return result;
    }

    private void ThrowInconsistent(BitmapDirectoryEntry entry)
        => ThrowHelper.Format(Name, (long)(_bitmapsExtension?.DirectoryOffset ?? 0) + BitmapDirectoryEntry.FlagsPosition(entry), "flags",
            $"bitmap '{entry.Name}' is inconsistent (IN_USE: the image was not closed cleanly while it was tracked); its content cannot be trusted");
}
