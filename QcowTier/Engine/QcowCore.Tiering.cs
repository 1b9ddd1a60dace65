using System.Buffers.Binary;
using System.Diagnostics;
using QcowTier.Format;
using QcowTier.Storage;

namespace QcowTier.Engine;

/// <summary>
/// The tiered layout: clusters live in the primary file (SSD) or in the HDD data file, selected by
/// L2 bit 61 (bit 63 for compressed clusters). The HDD file's refcounts live in the primary file, so
/// all metadata stays on SSD. See docs/FORMAT.md.
/// </summary>
internal sealed partial class QcowCore
{
    private const int Ssd = 0;
    private const int Hdd = 1;

    private ImageStorage? _hdd;
    private RefcountManager? _hddRefcounts;
    private TierExtension? _tier;
    private long _tierExtData = -1; // file offset of the TIER extension's data
    private List<(long Start, long Length, int Tier)> _pins = [];
    private long[]? _tierClusters; // allocated data clusters per tier, counted on first need
    private readonly long[] _tierInflight = new long[2]; // clusters allocated (and counted) whose L2 entries are not installed yet

    public bool IsTiered => _tier is not null;

    /// <summary>Opens (path, writable, create) the HDD data file; tests substitute a fault-injecting storage.</summary>
    internal Func<string, bool, bool, ImageStorage>? DataFileFactory { get; set; }

    private ImageStorage OpenDataFile(string path, bool writable, bool create, QcowCacheMode cacheMode)
    {
        if (DataFileFactory is not null)
        {
            return DataFileFactory(path, writable, create);
        }
        if (create)
        {
            return FileStorage.Open(path, writable: true, create: true);
        }
        return cacheMode == QcowCacheMode.None ? DirectFileStorage.Open(path, writable) : FileStorage.Open(path, writable);
    }

    public TierExtension? Tier => _tier;

    public string? TierDataPath { get; private set; }

    internal ImageStorage? HddFile => _hdd;

    internal RefcountManager? HddRefcounts => _hddRefcounts;

    private ImageStorage DataFile(int tier) => tier == Ssd ? _external ?? File : _hdd!;

    private RefcountManager Allocator(int tier) => tier == Ssd ? _refcounts : _hddRefcounts!;

    private int EntryTier(ulong e)
    {
        if (_tier is null)
        {
            return Ssd;
        }
        var bit = (e & ClusterLayout.Compressed) != 0 ? TierExtension.CompressedHddBit : TierExtension.L2HddBit;
        return (e & bit) != 0 ? Hdd : Ssd;
    }

    private static ulong TierBits(int tier) => tier == Hdd ? TierExtension.L2HddBit : 0;

    private void FreeCluster(ulong entry)
    {
        var tier = EntryTier(entry);
        if ((entry & ClusterLayout.Compressed) != 0)
        {
            FreeCompressed(entry, tier); // not counted in the tier totals, which count whole clusters
            return;
        }
        if (_external is null)
        {
            // Clusters of a QEMU external data file are not refcounted.
            Allocator(tier).QueueFree((long)(entry & ClusterLayout.L2OffsetMask), 1);
        }
        CountAllocated(tier, -1);
    }

    /// <summary>Counts a new allocation whose L2 entries are installed later (lock held).</summary>
    private void CountInflight(int tier, long clusters)
    {
        CountAllocated(tier, clusters);
        _tierInflight[tier] += clusters;
    }

    /// <summary>Ends an in-flight allocation: its entries were installed (already counted) or it was undone.</summary>
    private void EndInflight(int tier, long clusters, bool installed)
    {
        _tierInflight[tier] -= clusters;
        if (!installed)
        {
            CountAllocated(tier, -clusters);
        }
    }

    private void CountAllocated(int tier, long clusters)
    {
        if (_tierClusters is not null)
        {
            _tierClusters[tier] += clusters;
        }
    }

    /// <summary>Counts the allocated data clusters of each tier once, by walking the L2 tables (lock held).</summary>
    private long[] TierCounts()
    {
        if (_tierClusters is not null)
        {
            return _tierClusters;
        }
        var counts = new long[2];
        var entries = 1 << _l2Bits;
        for (var i = 0; i < _l1.Length; i++)
        {
            var l2 = GetL2(i);
            if (l2 is null)
            {
                continue;
            }
            for (var j = 0; j < entries; j++)
            {
                var e = Entry(l2, j);
                if (ClusterKinds.Classify(e) is ClusterKind.Normal or ClusterKind.ZeroAllocated)
                {
                    counts[EntryTier(e)]++;
                }
            }
        }
        // The walk cannot see allocations still in flight, which were counted when they were made.
        counts[Ssd] += _tierInflight[Ssd];
        counts[Hdd] += _tierInflight[Hdd];
        _tierClusters = counts;
        return counts;
    }

    /// <summary>Where new clusters at <paramref name="guestOffset"/> go: a pin wins, then the default tier within the SSD budget.</summary>
    private int ChooseTier(long guestOffset, int clusters)
    {
        if (_tier is null)
        {
            return Ssd;
        }
        foreach (var (start, length, tier) in _pins)
        {
            if (guestOffset >= start && guestOffset - start < length)
            {
                return tier;
            }
        }
        if ((_tier.Flags & TierExtension.FlagDefaultHdd) != 0)
        {
            return Hdd;
        }
        if (_tier.SsdBudget > 0 && (TierCounts()[Ssd] + clusters) * _clusterSize > _tier.SsdBudget)
        {
            return Hdd;
        }
        return Ssd;
    }

    /// <summary>Clusters the SSD budget still has room for at an unpinned offset whose default tier is SSD, else 0.</summary>
    private long SsdRoom(long guestOffset)
    {
        if (_tier is null || _tier.SsdBudget <= 0 || (_tier.Flags & TierExtension.FlagDefaultHdd) != 0
            || _pins.Any(p => guestOffset >= p.Start && guestOffset - p.Start < p.Length))
        {
            return 0;
        }
        return Math.Max(0, _tier.SsdBudget / _clusterSize - TierCounts()[Ssd]);
    }

    /// <summary>Keeps one allocation from straddling a pin boundary, so each cluster lands on its pinned tier.</summary>
    private long ClipToPins(long offset, long bytes)
    {
        if (_pins.Count == 0)
        {
            return bytes;
        }
        var end = offset + bytes;
        foreach (var (start, length, _) in _pins)
        {
            foreach (var edge in (ReadOnlySpan<long>)[start, start + length])
            {
                // Cut on both sides of an unaligned edge: the cluster holding it is allocated on its own,
                // so the whole clusters on either side each get their own tier.
                var down = edge & ~(long)(_clusterSize - 1);
                foreach (var cut in (ReadOnlySpan<long>)[down, down == edge ? edge : down + _clusterSize])
                {
                    if (cut > offset && cut < end)
                    {
                        end = cut;
                    }
                }
            }
        }
        return Math.Max(end - offset, Math.Min(bytes, _clusterSize - (offset & (_clusterSize - 1))));
    }

    // ---------------------------------------------------------------- open

    private static ulong KnownTierIncompat(QcowHeader h)
        => h.Extensions.Any(e => e.Type == TierExtension.Type) ? TierExtension.IncompatMask : 0;

    /// <summary>Opens the HDD data file named by the TIER extension (lock not needed: called from the constructor path).</summary>
    private void LoadTier(string? dataFileOverride, QcowCacheMode cacheMode)
    {
        if ((Header.IncompatibleFeatures & TierExtension.IncompatMask) == 0)
        {
            return; // a TIER extension without the bit is a leftover of an interrupted attach or detach: a plain image
        }
        var ext = Header.Extensions.First(e => e.Type == TierExtension.Type);
        _tier = TierExtension.Parse(ext.Data, ext.Offset, Name);
        _tierExtData = ext.Offset + 8;
        TierDataPath = dataFileOverride is not null ? Path.GetFullPath(dataFileOverride) : ResolveDataFile(_tier.DataFileName);
        if (DataFileFactory is null && !System.IO.File.Exists(TierDataPath))
        {
            throw new QcowFormatException($"the tier data file '{TierDataPath}' named by the image does not exist", Name, ext.Offset + 8 + TierExtension.OffsetName, "TIER data file name");
        }
        _hdd = OpenDataFile(TierDataPath, !ReadOnly, create: false, cacheMode);
        try
        {
            var head = new byte[TierDataFileHeader.Length];
            _hdd.Read(0, head);
            TierDataFileHeader.Validate(head, _tier.Uuid, _clusterBits, TierDataPath, Name);
            ValidateHostedTable(_tier.HddRefcountTableOffset, _tier.HddRefcountTableClusters, TierExtension.OffsetHddRefcountTableOffset, "TIER hdd refcount table");
            if (_tier.HintsCount > 0)
            {
                ValidateHostedTable(_tier.HintsOffset, (uint)QcowHeader.CeilDiv((long)_tier.HintsCount * TierExtension.HintEntrySize, _clusterSize), TierExtension.OffsetHintsOffset, "TIER hints table");
            }
            InitHddRefcounts();
            LoadPins();
        }
        catch
        {
            _hdd.Dispose();
            _hdd = null;
            throw;
        }
    }

    private void ValidateHostedTable(long offset, uint clusters, int field, string name)
    {
        if (offset <= 0 || (offset & (_clusterSize - 1)) != 0 || clusters == 0 || (long)clusters * _clusterSize > QcowHeader.MaxRefcountTableBytes
            || offset > File.Length - (long)clusters * _clusterSize)
        {
            ThrowHelper.Corrupt(Name, _tierExtData + field, name, $"table at 0x{offset:x} of {clusters} clusters is misaligned, empty, too large or past the end of the file");
        }
    }

    /// <summary>The data file name is resolved against the image's folder, never the process's current directory, and may not leave it.</summary>
    private string ResolveDataFile(string name)
    {
        if (Path.IsPathRooted(name) || name.Split('/', '\\').Any(p => p == ".."))
        {
            throw new QcowFormatException($"the tier data file name '{name}' must be relative to the image's folder and stay inside it", Name, _tierExtData + TierExtension.OffsetName, "TIER data file name");
        }
        var dir = Name is null ? null : Path.GetDirectoryName(Path.GetFullPath(Name));
        if (dir is null)
        {
            throw new QcowException("a tiered image opened from a stream or handle needs QcowOpenOptions.TierDataFile");
        }
        return Path.Combine(dir, name);
    }

    private void InitHddRefcounts()
    {
        if (_tier is null || _hdd is null)
        {
            return;
        }
        _hddRefcounts = new RefcountManager(File, _hdd, _refcounts, _clusterBits, Header.RefcountOrder,
            _tier.HddRefcountTableOffset, _tier.HddRefcountTableClusters, _refcountCacheBlocks, CommitHddTable);
    }

    private void CommitHddTable(long offset, uint clusters)
    {
        Span<byte> b = stackalloc byte[12];
        BinaryPrimitives.WriteUInt64BigEndian(b, (ulong)offset);
        BinaryPrimitives.WriteUInt32BigEndian(b[8..], clusters);
        File.Write(_tierExtData + TierExtension.OffsetHddRefcountTableOffset, b);
        _tier!.HddRefcountTableOffset = offset;
        _tier.HddRefcountTableClusters = clusters;
    }

    private void LoadPins()
    {
        _pins = [];
        if (_tier!.HintsCount == 0)
        {
            return;
        }
        var raw = new byte[_tier.HintsCount * TierExtension.HintEntrySize];
        File.Read(_tier.HintsOffset, raw);
        for (var i = 0; i < _tier.HintsCount; i++)
        {
            var e = raw.AsSpan(i * TierExtension.HintEntrySize);
            var start = (long)BinaryPrimitives.ReadUInt64BigEndian(e);
            var length = (long)BinaryPrimitives.ReadUInt64BigEndian(e[8..]);
            var tier = e[16];
            if (start < 0 || length <= 0 || tier > 1 || start > QcowHeader.MaxVirtualSize - length)
            {
                ThrowHelper.Corrupt(Name, _tier.HintsOffset + i * TierExtension.HintEntrySize, "TIER hint", $"pinned range {i} ([{start}, +{length}) on tier {tier}) is invalid");
            }
            _pins.Add((start, length, tier));
        }
    }

    // ---------------------------------------------------------------- attach and detach

    /// <summary>
    /// Turns this plain image into a tiered one, in place. Order: create the HDD file, allocate and
    /// write its refcount structures, flush; add the TIER extension (QEMU still sees a plain image
    /// with an unknown extension), flush; set the incompatible bit, flush.
    /// </summary>
    public void AttachTier(string dataFilePath, int defaultTier, long ssdBudget)
    {
        CheckWritable();
        if (Header.Version < 3)
        {
            throw new QcowUnsupportedFeatureException("tiering needs a version 3 image (compat=1.1)", Name, QcowHeader.OffsetVersion, "version");
        }
        if (_external is not null)
        {
            throw new QcowUnsupportedFeatureException("an image with a QEMU external data file (data_file) cannot be tiered", Name, QcowHeader.OffsetIncompatibleFeatures, "incompatible_features");
        }
        if (HasBacking)
        {
            // Tier data lives in whole images only; docs/FORMAT.md §1.3.
            throw new QcowUnsupportedFeatureException("tiered images with a backing file are not supported (flatten the image first)", Name, QcowHeader.OffsetBackingFileOffset, "backing_file_offset");
        }
        if (_extendedL2)
        {
            throw new QcowUnsupportedFeatureException("tiering images with extended L2 entries (subclusters) is not supported", Name, QcowHeader.OffsetIncompatibleFeatures, "incompatible_features");
        }
        lock (_lock)
        {
            if (_tier is not null)
            {
                throw new InvalidOperationException($"{Name ?? "image"} is already tiered (data file {TierDataPath})");
            }
            RefuseTierWithSnapshots();
            if (Name is null)
            {
                throw new InvalidOperationException("only an image opened from a path can be tiered: the data file is named relative to it");
            }
            var imageDir = Path.GetDirectoryName(Path.GetFullPath(Name))!;
            var full = Path.GetFullPath(dataFilePath, imageDir);
            var relative = Path.GetRelativePath(imageDir, full);
            if (relative.Split('/', '\\').Any(p => p == "..") || Path.IsPathRooted(relative))
            {
                throw new ArgumentException($"the tier data file must be inside the image's folder {imageDir} (got {full})", nameof(dataFilePath));
            }
            FlushLocked();
            // The image's identity (made durable first, when it has none) becomes the tier UUID: heat maps
            // recorded before the attach stay valid, and a retry after an interrupted attach recognises
            // the data file that attach left behind.
            var uuid = Identity();
            var hdd = CreateTierDataFile(full, uuid);
            try
            {
                hdd.Write(0, TierDataFileHeader.Build(uuid, _clusterBits, _clusterSize));
                hdd.Flush();
                // HDD refcounts: a one-cluster table and one block counting the HDD header cluster.
                var table = _refcounts.Allocate(1, out _);
                var block = _refcounts.Allocate(1, out _);
                var blockData = new byte[_clusterSize];
                RefcountBlock.Set(blockData, 0, Header.RefcountOrder, 1);
                var tableData = new byte[_clusterSize];
                BinaryPrimitives.WriteUInt64BigEndian(tableData, (ulong)block);
                File.Write(block, blockData);
                File.Write(table, tableData);
                _refcounts.WriteBack();
                File.Flush();
                var ext = new TierExtension
                {
                    Uuid = uuid,
                    Flags = defaultTier == Hdd ? TierExtension.FlagDefaultHdd : 0,
                    SsdBudget = ssdBudget,
                    HddRefcountTableOffset = table,
                    HddRefcountTableClusters = 1,
                    DataFileName = relative,
                };
                var list = Header.Extensions.Where(e => e.Type != TierExtension.Type).ToList();
                list.Add(new HeaderExtension(TierExtension.Type, ext.Serialize(), 0));
                list = WithFeatureName(list, add: true);
                if (!ExtensionsFit(list))
                {
                    // Small clusters: QEMU's table names features QEMU knows anyway; ours is the one it needs.
                    list = WithFeatureName(list, add: true, onlyOurs: true);
                }
                RewriteExtensions(list);
                Header.IncompatibleFeatures |= TierExtension.IncompatMask;
                WriteHeaderU64(QcowHeader.OffsetIncompatibleFeatures, Header.IncompatibleFeatures);
                File.Flush();
                _tier = ext;
                _tierExtData = Header.Extensions.First(e => e.Type == TierExtension.Type).Offset + 8;
                _hdd = hdd;
                TierDataPath = full;
                _pins = [];
                _tierClusters = null;
                InitHddRefcounts();
            }
            catch
            {
                if (_hdd is null)
                {
                    hdd.Dispose();
                }
                throw;
            }
        }
    }

    /// <summary>
    /// A new data file; or the one an interrupted attach of this image left (its header names this
    /// image, or it is empty because the header never reached the disk), which nothing references yet.
    /// Any other existing file is someone else's and is refused.
    /// </summary>
    private ImageStorage CreateTierDataFile(string full, Guid uuid)
    {
        ImageStorage existing;
        try
        {
            existing = OpenDataFile(full, writable: true, create: false, QcowCacheMode.Writeback);
        }
        catch (FileNotFoundException)
        {
            return OpenDataFile(full, writable: true, create: true, QcowCacheMode.Writeback);
        }
        try
        {
            var length = existing.Length;
            var head = new byte[(int)Math.Min(length, _clusterSize)];
            existing.Read(0, head);
            var owner = head.Length >= TierDataFileHeader.Length && BinaryPrimitives.ReadUInt64BigEndian(head) == TierDataFileHeader.Magic
                ? new Guid(head.AsSpan(TierDataFileHeader.OffsetUuid, 16), bigEndian: true)
                : (Guid?)null;
            var ours = owner == uuid;
            var empty = length <= _clusterSize && !head.AsSpan().ContainsAnyExcept((byte)0);
            if (!ours && !empty)
            {
                throw new IOException($"The tier data file '{full}' already exists and is not one an interrupted attach of this image left behind ({(owner is { } o ? $"it belongs to image {o}, this image is {uuid}" : "it is not a tier data file")}): move it away or choose another name.");
            }
            existing.SetLength(0);
            return existing;
        }
        catch
        {
            existing.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Moves every HDD cluster to the primary file, clears the incompatible bit (QEMU opens the image
    /// again from this moment), removes the extension and frees the HDD refcount structures.
    /// </summary>
    public void DetachTier(bool deleteDataFile)
    {
        CheckWritable();
        if (_tier is null)
        {
            throw new InvalidOperationException($"{Name ?? "image"} is not tiered");
        }
        MoveToTier(0, Size, Ssd, null, CancellationToken.None);
        lock (_lock)
        {
            FlushLocked();
            if (TierCounts()[Hdd] != 0)
            {
                throw new QcowException($"{Name ?? "image"}: {TierCounts()[Hdd]} clusters are still on the HDD tier; nothing was detached");
            }
            Header.IncompatibleFeatures &= ~TierExtension.IncompatMask;
            WriteHeaderU64(QcowHeader.OffsetIncompatibleFeatures, Header.IncompatibleFeatures);
            File.Flush();
            var list = Header.Extensions.Where(e => e.Type != TierExtension.Type).ToList();
            list = WithFeatureName(list, add: false);
            if (!list.Any(e => e.Type == IdentityExtension))
            {
                // The plain image keeps the tier's UUID as its identity: its heat maps stay valid.
                var id = new byte[16];
                _tier.Uuid.TryWriteBytes(id, bigEndian: true, out _);
                var withId = list.Append(new HeaderExtension(IdentityExtension, id, 0)).ToList();
                list = ExtensionsFit(withId) ? withId : list;
            }
            RewriteExtensions(list);
            // Only the (now unreferenced) HDD refcount structures and hints table remain to free.
            var table = _hddRefcounts!.Table;
            foreach (var block in table)
            {
                if (block != 0)
                {
                    _refcounts.FreeNow(block, 1);
                }
            }
            _refcounts.FreeNow(_tier.HddRefcountTableOffset, (int)_tier.HddRefcountTableClusters);
            if (_tier.HintsCount > 0)
            {
                _refcounts.FreeNow(_tier.HintsOffset, (int)QcowHeader.CeilDiv((long)_tier.HintsCount * TierExtension.HintEntrySize, _clusterSize));
            }
            _refcounts.WriteBack();
            File.Flush();
            var path = TierDataPath;
            _hdd!.Dispose();
            _hdd = null;
            _hddRefcounts = null;
            _tier = null;
            _tierExtData = -1;
            _pins = [];
            _tierClusters = null;
            _compressedTail[Hdd] = 0;
            TierDataPath = null;
            if (deleteDataFile && path is not null)
            {
                System.IO.File.Delete(path);
            }
        }
    }

    private bool ExtensionsFit(List<HeaderExtension> list)
        => Header.HeaderLength + list.Sum(e => 8 + ((e.Data.Length + 7) & ~7)) + 8 <= Math.Min(_clusterSize, 4096);

    private static List<HeaderExtension> WithFeatureName(List<HeaderExtension> list, bool add, bool onlyOurs = false)
    {
        var idx = list.FindIndex(e => e.Type == HeaderExtension.FeatureNameTable);
        var entries = new List<byte[]>();
        if (idx >= 0 && !onlyOurs)
        {
            var d = list[idx].Data;
            for (var i = 0; i + 48 <= d.Length; i += 48)
            {
                if (!(d[i] == 0 && d[i + 1] == TierExtension.IncompatBit))
                {
                    entries.Add(d.AsSpan(i, 48).ToArray());
                }
            }
        }
        if (add)
        {
            var e = new byte[48];
            e[0] = 0;
            e[1] = TierExtension.IncompatBit;
            System.Text.Encoding.ASCII.GetBytes(TierExtension.FeatureName, e.AsSpan(2));
            entries.Add(e);
        }
        var table = new HeaderExtension(HeaderExtension.FeatureNameTable, entries.SelectMany(x => x).ToArray(), 0);
        if (idx >= 0)
        {
            list[idx] = table;
        }
        else if (entries.Count > 0)
        {
            list.Insert(0, table);
        }
        return list;
    }

    /// <summary>
    /// Rewrites the extension area of cluster 0 in one write. Everything before the header length
    /// (including unknown header fields) is untouched; extensions keep their order.
    /// </summary>
    private void RewriteExtensions(List<HeaderExtension> list)
    {
        var start = Header.HeaderLength;
        var size = list.Sum(e => 8 + ((e.Data.Length + 7) & ~7)) + 8;
        if (!ExtensionsFit(list))
        {
            throw new QcowException($"{Name ?? "image"}: the header extensions ({size} bytes) do not fit in the first {Math.Min(_clusterSize, 4096) - start} bytes after the header");
        }
        // Also zero what the old, longer area left behind, so nothing stale follows the end marker.
        var old = Header.Extensions.Count == 0 ? 0 : (int)(Header.Extensions.Max(e => e.Offset + 8 + ((e.Data.Length + 7) & ~7)) + 8 - start);
        var buf = new byte[Math.Max(size, old)];
        var pos = 0;
        var updated = new List<HeaderExtension>();
        foreach (var e in list)
        {
            BinaryPrimitives.WriteUInt32BigEndian(buf.AsSpan(pos), e.Type);
            BinaryPrimitives.WriteUInt32BigEndian(buf.AsSpan(pos + 4), (uint)e.Data.Length);
            e.Data.CopyTo(buf.AsSpan(pos + 8));
            updated.Add(e with { Offset = start + pos });
            pos += 8 + ((e.Data.Length + 7) & ~7);
        }
        File.Write(start, buf);
        File.Flush();
        Header.Extensions.Clear();
        Header.Extensions.AddRange(updated);
    }

    // ---------------------------------------------------------------- identity

    /// <summary>Header extension "QTID": a 16-byte UUID naming a plain image, so heat maps can be bound to it.</summary>
    internal const uint IdentityExtension = 0x51544944;

    /// <summary>
    /// The image's identity: the tier UUID of a tiered image, else the UUID of the QTID extension
    /// (added on a writable image when first asked), else — read-only and without one — a UUID derived
    /// from the header's geometry, which is weaker (it changes when the image is resized).
    /// </summary>
    public Guid Identity()
    {
        lock (_lock)
        {
            if (_tier is not null)
            {
                return _tier.Uuid;
            }
            var ext = Header.Extensions.FirstOrDefault(e => e.Type == IdentityExtension && e.Data.Length >= 16);
            if (ext is not null)
            {
                return new Guid(ext.Data.AsSpan(0, 16), bigEndian: true);
            }
            // A TIER extension without the incompatible bit is what an interrupted attach or detach left:
            // its UUID still names the image (and the data file that attach created).
            var stale = Header.Extensions.FirstOrDefault(e => e.Type == TierExtension.Type && e.Data.Length >= TierExtension.OffsetUuid + 16);
            if (stale is not null)
            {
                return new Guid(stale.Data.AsSpan(TierExtension.OffsetUuid, 16), bigEndian: true);
            }
            if (!ReadOnly && Header.Version >= 3)
            {
                var id = Guid.NewGuid();
                var data = new byte[16];
                id.TryWriteBytes(data, bigEndian: true, out _);
                var list = Header.Extensions.ToList();
                list.Add(new HeaderExtension(IdentityExtension, data, 0));
                if (ExtensionsFit(list))
                {
                    RewriteExtensions(list);
                    return id;
                }
            }
            Span<byte> seed = stackalloc byte[24];
            BinaryPrimitives.WriteInt64BigEndian(seed, Header.Size);
            BinaryPrimitives.WriteInt64BigEndian(seed[8..], Header.RefcountTableOffset);
            BinaryPrimitives.WriteInt64BigEndian(seed[16..], ((long)Header.ClusterBits << 32) | Header.Version);
            return new Guid(System.Security.Cryptography.SHA256.HashData(seed).AsSpan(0, 16));
        }
    }

    // ---------------------------------------------------------------- policy and pins

    public void SetTierPolicy(int defaultTier, long ssdBudget)
    {
        CheckWritable();
        RequireTier();
        ArgumentOutOfRangeException.ThrowIfNegative(ssdBudget);
        lock (_lock)
        {
            var flags = defaultTier == Hdd ? _tier!.Flags | TierExtension.FlagDefaultHdd : _tier!.Flags & ~TierExtension.FlagDefaultHdd;
            // Flags and budget change together: rewrite the fixed part from the flags to the budget in
            // one small write (the fields between keep their current values), so a cut cannot mix policies.
            var next = new TierExtension
            {
                Flags = flags,
                Uuid = _tier.Uuid,
                HddRefcountTableOffset = _tier.HddRefcountTableOffset,
                HddRefcountTableClusters = _tier.HddRefcountTableClusters,
                HintsCount = _tier.HintsCount,
                HintsOffset = _tier.HintsOffset,
                SsdBudget = ssdBudget,
                DataFileName = _tier.DataFileName,
            }.Serialize();
            File.Write(_tierExtData + TierExtension.OffsetFlags, next.AsSpan(TierExtension.OffsetFlags, TierExtension.OffsetNameLength - TierExtension.OffsetFlags));
            File.Flush();
            _tier.Flags = flags;
            _tier.SsdBudget = ssdBudget;
        }
    }

    private void RequireTier()
    {
        if (_tier is null)
        {
            throw new InvalidOperationException($"{Name ?? "image"} is not a tiered image");
        }
    }

    public IReadOnlyList<(long Start, long Length, int Tier)> Pins
    {
        get
        {
            lock (_lock)
            {
                return _pins.ToArray();
            }
        }
    }

    /// <summary>Pins (tier 0/1) or unpins (tier -1) a guest range; the table is rewritten copy-on-write and switched with one write.</summary>
    public void SetPin(long start, long length, int tier)
    {
        CheckWritable();
        RequireTier();
        CheckRange(start, length);
        lock (_lock)
        {
            var end = start + length;
            var next = new List<(long Start, long Length, int Tier)>();
            foreach (var (s, l, t) in _pins)
            {
                var e = s + l;
                if (e <= start || s >= end)
                {
                    next.Add((s, l, t));
                    continue;
                }
                if (s < start)
                {
                    next.Add((s, start - s, t));
                }
                if (e > end)
                {
                    next.Add((end, e - end, t));
                }
            }
            if (tier >= 0 && length > 0)
            {
                next.Add((start, length, tier));
            }
            next.Sort((a, b) => a.Start.CompareTo(b.Start));
            // Merge touching ranges of the same tier.
            var merged = new List<(long Start, long Length, int Tier)>();
            foreach (var p in next)
            {
                if (merged.Count > 0 && merged[^1].Tier == p.Tier && merged[^1].Start + merged[^1].Length == p.Start)
                {
                    merged[^1] = (merged[^1].Start, merged[^1].Length + p.Length, p.Tier);
                }
                else
                {
                    merged.Add(p);
                }
            }
            if (merged.Count > TierExtension.MaxHints)
            {
                throw new InvalidOperationException($"at most {TierExtension.MaxHints} pinned ranges are allowed");
            }
            WritePins(merged);
        }
    }

    private void WritePins(List<(long Start, long Length, int Tier)> pins)
    {
        long newOff = 0;
        var clusters = (int)QcowHeader.CeilDiv((long)pins.Count * TierExtension.HintEntrySize, _clusterSize);
        if (pins.Count > 0)
        {
            newOff = _refcounts.Allocate(clusters, out _);
            var raw = new byte[(long)clusters * _clusterSize];
            for (var i = 0; i < pins.Count; i++)
            {
                var e = raw.AsSpan(i * TierExtension.HintEntrySize);
                BinaryPrimitives.WriteUInt64BigEndian(e, (ulong)pins[i].Start);
                BinaryPrimitives.WriteUInt64BigEndian(e[8..], (ulong)pins[i].Length);
                e[16] = (byte)pins[i].Tier;
            }
            File.Write(newOff, raw);
            SyncRefcounts();
        }
        Span<byte> b = stackalloc byte[12];
        BinaryPrimitives.WriteUInt32BigEndian(b, (uint)pins.Count);
        BinaryPrimitives.WriteUInt64BigEndian(b[4..], (ulong)newOff);
        File.Write(_tierExtData + TierExtension.OffsetHintsCount, b);
        File.Flush();
        if (_tier!.HintsCount > 0)
        {
            _refcounts.FreeNow(_tier.HintsOffset, (int)QcowHeader.CeilDiv((long)_tier.HintsCount * TierExtension.HintEntrySize, _clusterSize));
        }
        _tier.HintsCount = (uint)pins.Count;
        _tier.HintsOffset = newOff;
        _pins = pins;
    }

    // ---------------------------------------------------------------- placement

    public (long Ssd, long Hdd) TierBytes()
    {
        lock (_lock)
        {
            var c = TierCounts();
            return (c[Ssd] * _clusterSize, c[Hdd] * _clusterSize);
        }
    }

    // ---------------------------------------------------------------- moving clusters between tiers

    private const int MoveBatchClusters = 1024;
    private const int MoveIoBytes = 4 << 20;

    /// <summary>
    /// Moves every allocated cluster of the guest range to <paramref name="target"/>, in batches:
    /// copy, flush the target, flip the L2 entries, flush the metadata, free the sources. A crash at
    /// any point leaves each cluster readable at its old or its new place, and at worst leaks.
    /// </summary>
    public (long Clusters, long Bytes) MoveToTier(long offset, long length, int target, IProgress<long>? progress, CancellationToken ct)
        => MoveRangesToTier([(offset, length)], target, progress, ct);

    /// <summary>
    /// Moves the allocated clusters of many guest ranges in shared batches, so a scattered plan costs
    /// one copy-flush-flip-flush cycle per batch of up to 1024 clusters, not one per range.
    /// </summary>
    public (long Clusters, long Bytes) MoveRangesToTier(IReadOnlyList<(long Offset, long Length)> ranges, int target, IProgress<long>? progress, CancellationToken ct)
    {
        CheckWritable();
        RequireTier();
        var spans = new List<(long Start, long End)>();
        foreach (var (offset, length) in ranges)
        {
            CheckRange(offset, length);
            var s = offset & ~(long)(_clusterSize - 1);
            var e = Math.Min(RoundUp(offset + length), RoundUp(Size));
            if (e > s)
            {
                spans.Add((s, e));
            }
        }
        spans.Sort();
        var ri = 0;
        var pos = spans.Count > 0 ? spans[0].Start : 0;
        long moved = 0;
        var buffer = System.Buffers.ArrayPool<byte>.Shared.Rent(Math.Max(MoveIoBytes, _clusterSize));
        try
        {
            return MoveLoop(spans, ref ri, ref pos, target, progress, buffer, ref moved, ct);
        }
        finally
        {
            System.Buffers.ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    private (long Clusters, long Bytes) MoveLoop(List<(long Start, long End)> spans, ref int ri, ref long pos, int target, IProgress<long>? progress, byte[] buffer, ref long moved, CancellationToken ct)
    {
        while (ri < spans.Count)
        {
            ct.ThrowIfCancellationRequested();
            var batch = new List<(long Guest, long Source, long Dest, bool Zero)>();
            TaskCompletionSource? done = null;
            Task? wait = null;
            long dest = 0;
            var sourceTier = 1 - target;
            (long Guest, ulong Entry) compressed = (-1, 0);
            lock (_lock)
            {
                var scan = pos;
                var sri = ri;
                while (batch.Count < MoveBatchClusters)
                {
                    if (scan >= spans[sri].End)
                    {
                        if (++sri >= spans.Count)
                        {
                            break;
                        }
                        scan = Math.Max(scan, spans[sri].Start);
                        continue;
                    }
                    var guestCluster = scan >> _clusterBits;
                    if (_inflight.TryGetValue(guestCluster, out var t))
                    {
                        if (batch.Count == 0)
                        {
                            wait = t.Task;
                        }
                        break;
                    }
                    var l1Index = (int)(scan >> (_clusterBits + _l2Bits));
                    var l2 = l1Index < _l1.Length ? GetL2(l1Index) : null;
                    if (l2 is null)
                    {
                        scan = (long)(l1Index + 1) << (_clusterBits + _l2Bits);
                        continue;
                    }
                    var l2Off = (long)(_l1[l1Index] & ClusterLayout.L1OffsetMask);
                    var idx = (int)(guestCluster & ((1 << _l2Bits) - 1));
                    var e = Entry(l2, idx);
                    var kind = ClusterKinds.Classify(e);
                    if (kind is ClusterKind.Normal or ClusterKind.ZeroAllocated && EntryTier(e) == sourceTier)
                    {
                        if ((e & ClusterLayout.Copied) == 0 || (_l1[l1Index] & ClusterLayout.Copied) == 0)
                        {
                            throw new QcowUnsupportedFeatureException($"cluster at guest offset 0x{scan:x} is shared (no COPIED flag); moving shared clusters is not supported", Name, l2Off + idx * 8L, "L2 entry");
                        }
                        batch.Add((guestCluster, ValidateDataOffset(e, l2Off, idx), 0, kind == ClusterKind.ZeroAllocated));
                    }
                    else if (kind == ClusterKind.Compressed && EntryTier(e) == sourceTier)
                    {
                        // Compressed clusters move one at a time, after the batch gathered so far.
                        if (batch.Count == 0)
                        {
                            compressed = (guestCluster, e);
                            done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                            _inflight.Add(guestCluster, done);
                            scan += _clusterSize;
                        }
                        break;
                    }
                    scan += _clusterSize;
                }
                if (batch.Count > 0)
                {
                    done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                    foreach (var b in batch)
                    {
                        _inflight.Add(b.Guest, done);
                    }
                    // Targets are allocated contiguously, so a demoted batch lands sequentially on HDD.
                    dest = Allocator(target).Allocate(batch.Count, out _);
                    CountInflight(target, batch.Count);
                }
                else if (wait is null && compressed.Guest < 0)
                {
                    pos = scan;
                    ri = sri;
                    continue;
                }
                // Destinations follow source order: runs contiguous on the source stay contiguous on the target.
                batch.Sort((a, b) => a.Source.CompareTo(b.Source));
                for (var i = 0; i < batch.Count; i++)
                {
                    batch[i] = batch[i] with { Dest = dest + ((long)i << _clusterBits) };
                }
                pos = scan;
                ri = sri;
            }
            if (wait is not null)
            {
                wait.GetAwaiter().GetResult();
                continue;
            }
            if (compressed.Guest >= 0)
            {
                MoveCompressed(compressed.Guest, compressed.Entry, target, done!);
                moved++;
                progress?.Report(moved * _clusterSize);
                continue;
            }
            try
            {
                // In-place writes that looked these clusters up before they went in flight must land first.
                var spin = new SpinWait();
                while (Volatile.Read(ref _activeWrites) != 0)
                {
                    spin.SpinOnce();
                }
                CopyBatch(batch, sourceTier, target, buffer);
                // Preallocated zero clusters are not copied: make sure the file still covers them.
                DataFile(target).EnsureLength(dest + ((long)batch.Count << _clusterBits));
                DataFile(target).Flush();
            }
            catch
            {
                lock (_lock)
                {
                    Allocator(target).FreeNow(dest, batch.Count);
                    EndInflight(target, batch.Count, installed: false);
                    foreach (var b in batch)
                    {
                        _inflight.Remove(b.Guest);
                    }
                    done!.SetResult();
                }
                throw;
            }
            lock (_lock)
            {
                foreach (var b in batch)
                {
                    var l1Index = (int)(b.Guest >> _l2Bits);
                    var (table, l2Off) = GetL2ForWrite(l1Index);
                    var idx = (int)(b.Guest & ((1 << _l2Bits) - 1));
                    var old = Entry(table, idx);
                    FreeCluster(old);
                    SetEntry(table, idx, (ulong)b.Dest | ClusterLayout.Copied | TierBits(target) | (b.Zero ? ClusterLayout.Zero : 0));
                    _l2.MarkDirty(l2Off);
                    _inflight.Remove(b.Guest);
                }
                EndInflight(target, batch.Count, installed: true);
                done!.SetResult();
                FlushLocked();
            }
            moved += batch.Count;
            progress?.Report(moved * _clusterSize);
        }
        return (moved, moved * _clusterSize);
    }

    /// <summary>Copies a batch, merging neighbours whose sources and destinations are both contiguous into large I/Os.</summary>
    private void CopyBatch(List<(long Guest, long Source, long Dest, bool Zero)> batch, int sourceTier, int target, byte[] buffer)
    {
        var order = batch.Where(b => !b.Zero).ToList(); // already in source order
        var src = DataFile(sourceTier);
        var dst = DataFile(target);
        var i = 0;
        while (i < order.Count)
        {
            var j = i + 1;
            while (j < order.Count && (j - i + 1L) * _clusterSize <= buffer.Length
                && order[j].Source == order[j - 1].Source + _clusterSize && order[j].Dest == order[j - 1].Dest + _clusterSize)
            {
                j++;
            }
            var bytes = (j - i) * _clusterSize;
            src.Read(order[i].Source, buffer.AsSpan(0, bytes));
            dst.Write(order[i].Dest, buffer.AsSpan(0, bytes));
            i = j;
        }
        Debug.Assert(i == order.Count);
    }
}
