using QcowTier.Storage;
using QcowTier.Tests.Crash;

namespace QcowTier.Tests.Tiering.Support;

/// <summary>
/// One power supply for several <see cref="FaultInjectingStorage"/> disks: a single write counter
/// across all of them, and a cut at its N-th write takes every disk down at once (that write and
/// every later write and flush fail; nothing unflushed becomes durable).
/// </summary>
internal sealed class PowerLine
{
    private readonly object _gate = new();
    private readonly List<FaultInjectingStorage> _disks = [];
    private long _writes;
    private long _cutAt = long.MaxValue;

    public bool IsCut { get; private set; }

    public long Writes
    {
        get
        {
            lock (_gate)
            {
                return _writes;
            }
        }
    }

    /// <summary>Called before every write with (file name, offset, length), outside the line's lock: tests park writers here.</summary>
    public Action<string, long, int>? BeforeWriteHook { get; set; }

    public void Attach(FaultInjectingStorage disk)
    {
        lock (_gate)
        {
            _disks.Add(disk);
            if (IsCut)
            {
                disk.CutAtWrite(1);
            }
        }
    }

    /// <summary>Restarts the count; the <paramref name="n"/>-th write from now (1-based) cuts the power.</summary>
    public void ArmAt(long n)
    {
        lock (_gate)
        {
            _writes = 0;
            _cutAt = n;
        }
    }

    public void BeforeWrite()
    {
        lock (_gate)
        {
            if (IsCut)
            {
                throw new IOException("simulated power cut: the devices are gone");
            }
            _writes++;
            if (_writes >= _cutAt)
            {
                IsCut = true;
                foreach (var d in _disks)
                {
                    d.CutAtWrite(1);
                }
                throw new IOException($"simulated power cut at write {_writes}");
            }
        }
    }
}

/// <summary>A <see cref="FaultInjectingStorage"/> powered by a shared <see cref="PowerLine"/>.</summary>
internal sealed class LinedStorage : ImageStorage
{
    private readonly FaultInjectingStorage _disk;
    private readonly PowerLine _line;
    private readonly string _name;

    public LinedStorage(FaultInjectingStorage disk, PowerLine line, string name)
    {
        _disk = disk;
        _line = line;
        _name = name;
    }

    public override string? Name => _name;

    public override long Length => _disk.Length;

    public override bool CanWrite => true;

    public override void Read(long offset, Span<byte> buffer) => _disk.Read(offset, buffer);

    public override void Write(long offset, ReadOnlySpan<byte> data)
    {
        _line.BeforeWriteHook?.Invoke(_name, offset, data.Length);
        _line.BeforeWrite();
        _disk.Write(offset, data);
    }

    public override void SetLength(long length)
    {
        _line.BeforeWrite();
        _disk.SetLength(length);
    }

    public override void Flush() => _disk.Flush();
}

/// <summary>How the unflushed writes are treated when the power goes.</summary>
internal enum Survival
{
    /// <summary>All lost: the disks hold their durable bytes.</summary>
    DropAll,

    /// <summary>A random subset survives, in random order.</summary>
    RandomSubset,

    /// <summary>A random subset of 512-byte sectors survives, in random order.</summary>
    TornSectors,
}

/// <summary>
/// The primary file and the HDD data file of a tiered image, in memory, on one power line; the
/// data file factory hands the engine the HDD disk (created on demand, as a file would be).
/// </summary>
internal sealed class TierDisks
{
    private readonly Dictionary<string, FaultInjectingStorage> _disks = [];

    public TierDisks(string primaryPath, byte[]? primary = null, IReadOnlyDictionary<string, byte[]>? others = null)
    {
        PrimaryPath = primaryPath;
        Primary = new FaultInjectingStorage(primary, primaryPath);
        Line.Attach(Primary);
        foreach (var (path, bytes) in others ?? new Dictionary<string, byte[]>())
        {
            Add(path, new FaultInjectingStorage(bytes, path));
        }
    }

    public PowerLine Line { get; } = new();

    public string PrimaryPath { get; }

    public FaultInjectingStorage Primary { get; }

    public IReadOnlyDictionary<string, FaultInjectingStorage> Others => _disks;

    private void Add(string path, FaultInjectingStorage disk)
    {
        _disks[path] = disk;
        Line.Attach(disk);
    }

    public ImageStorage PrimaryStorage() => new LinedStorage(Primary, Line, PrimaryPath);

    /// <summary>The engine's data file factory: (path, writable, create).</summary>
    public ImageStorage OpenDataFile(string path, bool writable, bool create)
    {
        if (create)
        {
            if (_disks.ContainsKey(path))
            {
                throw new IOException($"The file '{path}' already exists.");
            }
            Add(path, new FaultInjectingStorage(null, path));
        }
        else if (!_disks.ContainsKey(path))
        {
            throw new FileNotFoundException($"Could not find file '{path}'.", path);
        }
        return new LinedStorage(_disks[path], Line, path);
    }

    public QcowImage Open(bool readOnly)
        => QcowImage.OpenOn(PrimaryStorage(), new QcowOpenOptions { ReadOnly = readOnly }, OpenDataFile);

    public QcowImage Create(long size, QcowCreateOptions options)
        => QcowImage.CreateOn(PrimaryStorage(), size, options, OpenDataFile);

    /// <summary>New disks holding what survived the power cut (a file created before the cut survives, its content as the mode says).</summary>
    public TierDisks AfterCut(Survival mode, Random rng)
    {
        byte[] Bytes(FaultInjectingStorage d) => mode switch
        {
            Survival.DropAll => d.DurableImage(),
            Survival.RandomSubset => d.CrashImage(rng, 0.5, tear: false),
            _ => d.CrashImage(rng, 0.5, tear: true),
        };
        return new TierDisks(PrimaryPath, Bytes(Primary), _disks.ToDictionary(kv => kv.Key, kv => Bytes(kv.Value)));
    }

    /// <summary>Copies of the durable bytes, when nothing is pending (after a clean close).</summary>
    public TierDisks Clone() => AfterCut(Survival.DropAll, new Random(0));
}
