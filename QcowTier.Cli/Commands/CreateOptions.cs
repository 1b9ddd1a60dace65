using System.Globalization;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>
/// qemu-img's -o key=value list for a format: parsed and type-checked as QemuOpts does, printed in
/// QEMU's order for the "Formatting ..." line, then checked against what QcowTier supports.
/// </summary>
internal sealed class CreateOptions
{
    private enum Kind
    {
        Size,
        Number,
        Bool,
        Text,
    }

    private sealed record Spec(string Name, Kind Kind, string? Default, string Help);

    // The order is QEMU's print order for the merged format + file protocol option lists.
    private static readonly Spec[] Qcow2Specs =
    [
        new("cluster_size", Kind.Size, "65536", "qcow2 cluster size"),
        new("extended_l2", Kind.Bool, "off", "Extended L2 tables"),
        new("preallocation", Kind.Text, null, "Preallocation mode (allowed values: off, metadata, falloc, full)"),
        new("compression_type", Kind.Text, "zlib", "Compression method used for image cluster compression"),
        new("size", Kind.Size, null, "Virtual disk size"),
        new("compat", Kind.Text, null, "Compatibility level (v2 [0.10] or v3 [1.1])"),
        new("backing_file", Kind.Text, null, "File name of a base image"),
        new("backing_fmt", Kind.Text, null, "Image format of the base image"),
        new("encryption", Kind.Bool, null, "Encrypt the image with format 'aes'"),
        new("encrypt.format", Kind.Text, null, "Encrypt the image, format choices: 'aes', 'luks'"),
        new("data_file", Kind.Text, null, "File name of an external data file"),
        new("data_file_raw", Kind.Bool, null, "The external data file must stay valid as a raw image"),
        new("lazy_refcounts", Kind.Bool, "off", "Postpone refcount updates"),
        new("refcount_bits", Kind.Number, "16", "Width of a reference count entry in bits"),
        new("nocow", Kind.Bool, null, "Turn off copy-on-write (valid only on btrfs)"),
        new("extent_size_hint", Kind.Size, null, "Extent size hint for the image file, 0 to disable"),
        new("tier_data_file", Kind.Text, null, "QcowTier: HDD data file of a tiered image (relative to the image's folder)"),
        new("tier_default", Kind.Text, null, "QcowTier: tier of new clusters, ssd or hdd (default ssd)"),
        new("ssd_budget", Kind.Size, null, "QcowTier: bytes of data the SSD tier takes before new clusters go to HDD"),
    ];

    private static readonly Spec[] RawSpecs =
    [
        new("size", Kind.Size, null, "Virtual disk size"),
        new("nocow", Kind.Bool, null, "Turn off copy-on-write (valid only on btrfs)"),
        new("preallocation", Kind.Text, null, "Preallocation mode (allowed values: off, falloc, full)"),
        new("extent_size_hint", Kind.Size, null, "Extent size hint for the image file, 0 to disable"),
    ];

    private readonly Spec[] _specs;
    private readonly Dictionary<string, (string Text, ulong Number)> _values = [];

    private CreateOptions(string format, Spec[] specs)
    {
        Format = format;
        _specs = specs;
    }

    public string Format { get; }

    /// <summary>Parses every -o argument (later keys win); throws with QEMU's wording on a bad value.</summary>
    public static CreateOptions Parse(string format, IEnumerable<string> optionArgs)
    {
        var result = new CreateOptions(format, format == "qcow2" ? Qcow2Specs : RawSpecs);
        foreach (var arg in optionArgs)
        {
            foreach (var item in arg.Split(',', StringSplitOptions.RemoveEmptyEntries))
            {
                var eq = item.IndexOf('=', StringComparison.Ordinal);
                var key = eq >= 0 ? item[..eq] : item;
                var value = eq >= 0 ? item[(eq + 1)..] : null;
                result.Set(key, value);
            }
        }
        return result;
    }

    /// <summary>The keys given in -o arguments, in order (for verbs that accept only some of them).</summary>
    public static IEnumerable<string> Keys(IEnumerable<string> optionArgs)
        => optionArgs.SelectMany(a => a.Split(',', StringSplitOptions.RemoveEmptyEntries)).Select(i => i.Split('=', 2)[0]);

    /// <summary>"-o help": the options of the format.</summary>
    public static bool IsHelp(IEnumerable<string> optionArgs) => optionArgs.Any(a => a is "help" or "?");

    public static void PrintHelp(string format, TextWriter w)
    {
        w.WriteLine($"Supported {format} options:");
        foreach (var s in (format == "qcow2" ? Qcow2Specs : RawSpecs).OrderBy(s => s.Name, StringComparer.Ordinal))
        {
            var type = s.Kind switch
            {
                Kind.Size => "<size>",
                Kind.Number => "<num>",
                Kind.Bool => "<bool (on/off)>",
                _ => "<str>",
            };
            w.WriteLine($"  {(s.Name + "=" + type).PadRight(22)} - {s.Help}");
        }
    }

    private void Set(string key, string? value)
    {
        var spec = _specs.FirstOrDefault(s => s.Name == key) ?? throw new CliException($"Invalid parameter '{key}'");
        switch (spec.Kind)
        {
            case Kind.Size:
                if (value is null || SizeParser.TryParse(value, out var size) != SizeParser.Outcome.Ok)
                {
                    throw new CliException($"Parameter '{key}' expects a non-negative number below 2^64");
                }
                _values[key] = (size.ToString(CultureInfo.InvariantCulture), size);
                break;
            case Kind.Number:
                if (value is null || !SizeParser.TryParseInteger(value, out var n))
                {
                    throw new CliException($"Parameter '{key}' expects a number");
                }
                _values[key] = (n.ToString(CultureInfo.InvariantCulture), n);
                break;
            case Kind.Bool:
                value ??= "on";
                ulong b = value switch
                {
                    "on" or "yes" or "true" or "y" => 1,
                    "off" or "no" or "false" or "n" => 0,
                    _ => throw new CliException($"Parameter '{key}' expects 'on' or 'off'"),
                };
                _values[key] = (value, b);
                break;
            default:
                _values[key] = (value ?? "", 0);
                break;
        }
    }

    public bool IsSet(string key) => _values.ContainsKey(key);

    /// <summary>Sets a text option as if given with -o (qemu-img's -b and -F).</summary>
    public void SetText(string key, string value) => Set(key, value);

    public string? Text(string key) => _values.TryGetValue(key, out var v) ? v.Text : _specs.First(s => s.Name == key).Default;

    public ulong? Number(string key)
    {
        if (_values.TryGetValue(key, out var v))
        {
            return v.Number;
        }
        var d = _specs.First(s => s.Name == key).Default;
        return d is null ? null : ulong.Parse(d, CultureInfo.InvariantCulture);
    }

    public bool Flag(string key) => _values.TryGetValue(key, out var v) ? v.Number == 1 : Text(key) is "on";

    public void SetSize(ulong size) => _values["size"] = (size.ToString(CultureInfo.InvariantCulture), size);

    /// <summary>qemu_opts_print: every option with a value or a default, in QEMU's order.</summary>
    public string Describe()
    {
        var parts = new List<string>();
        foreach (var s in _specs)
        {
            var v = Text(s.Name);
            if (v is not null)
            {
                parts.Add($"{s.Name}={v}");
            }
        }
        return string.Join(' ', parts);
    }

    /// <summary>The library's options, after QEMU's checks (made once the Formatting line is out).</summary>
    public QcowCreateOptions ToQcow(long size, bool unsafeBacking = false)
    {
        var (backingFile, backingFormat) = CreateBacking.Check(this);
        if (Flag("encryption") || IsSet("encrypt.format"))
        {
            throw new CliException("encrypted images are not supported");
        }
        var compat = Text("compat") switch
        {
            null or "v3" or "1.1" => QcowCompat.V3,
            "v2" or "0.10" => QcowCompat.V2,
            var other => throw new CliException($"Parameter 'version' does not accept value '{other}'"),
        };
        var prealloc = Text("preallocation") switch
        {
            null or "off" => QcowPreallocation.Off,
            "metadata" => QcowPreallocation.Metadata,
            "falloc" => QcowPreallocation.Falloc,
            "full" => QcowPreallocation.Full,
            var other => throw new CliException($"Parameter 'preallocation' does not accept value '{other}'"),
        };
        var compression = Text("compression_type") switch
        {
            "zlib" => QcowCompressionType.Zlib,
            "zstd" => QcowCompressionType.Zstd,
            var other => throw new CliException($"Parameter 'compression-type' does not accept value '{other}'"),
        };
        if (compression != QcowCompressionType.Zlib && compat == QcowCompat.V2)
        {
            throw new CliException("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if (backingFile is not null && prealloc != QcowPreallocation.Off)
        {
            throw new CliException("Backing file and preallocation can only be used at the same time if extended_l2 is on");
        }
        var extendedL2 = Flag("extended_l2");
        if (extendedL2 && compat == QcowCompat.V2)
        {
            throw new CliException("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        var clusterSize = Number("cluster_size")!.Value;
        if (clusterSize < 512 || clusterSize > 2 * 1024 * 1024 || (clusterSize & (clusterSize - 1)) != 0)
        {
            throw new CliException("Cluster size must be a power of two between 512 and 2048k");
        }
        if (extendedL2 && clusterSize < 16384)
        {
            throw new CliException("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
        }
        var refcountBits = Number("refcount_bits")!.Value;
        if (refcountBits is 0 or > 64 || (refcountBits & (refcountBits - 1)) != 0)
        {
            throw new CliException("Refcount width must be a power of two and may not exceed 64 bits");
        }
        if (compat == QcowCompat.V2 && refcountBits != 16)
        {
            throw new CliException("Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)");
        }
        var lazy = Flag("lazy_refcounts");
        if (compat == QcowCompat.V2 && lazy)
        {
            throw new CliException("Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        var dataFile = Text("data_file") is { Length: > 0 } df ? df : null;
        if (dataFile is not null && compat == QcowCompat.V2)
        {
            throw new CliException("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        }
        if (Flag("data_file_raw") && dataFile is null)
        {
            throw new CliException("data-file-raw requires data-file");
        }
        // QEMU's limit is the L1 table's size (32 MiB of 8-byte entries, each mapping one L2 table).
        var l2Coverage = (UInt128)clusterSize * (clusterSize / 8);
        if ((UInt128)size > l2Coverage * (32UL * 1024 * 1024 / 8) || size > (1L << 62))
        {
            throw new CliException("The image size is too large for file format 'qcow2' (try using a larger cluster size)");
        }
        QcowTierOptions? tier = null;
        if (Text("tier_data_file") is { Length: > 0 } tierDataFile)
        {
            if (dataFile is not null)
            {
                throw new CliException("A tiered image cannot also use a QEMU external data file (data_file)");
            }
            if (backingFile is not null)
            {
                throw new CliException("Tiered images with a backing file are not supported");
            }
            if (compat == QcowCompat.V2)
            {
                throw new CliException("Tiered images need compatibility level 1.1 (compat=1.1)");
            }
            tier = new QcowTierOptions
            {
                DataFile = tierDataFile,
                DefaultTier = Text("tier_default") switch
                {
                    null or "ssd" => StorageTier.Ssd,
                    "hdd" => StorageTier.Hdd,
                    var other => throw new CliException($"Parameter 'tier_default' does not accept value '{other}' (ssd or hdd)"),
                },
                SsdBudget = (long)(Number("ssd_budget") ?? 0),
            };
        }
        else if (IsSet("tier_default") || IsSet("ssd_budget"))
        {
            throw new CliException("tier_default and ssd_budget need tier_data_file");
        }
        return new QcowCreateOptions
        {
            ClusterSize = (int)clusterSize,
            RefcountBits = (int)refcountBits,
            Compat = compat,
            LazyRefcounts = lazy,
            Preallocation = prealloc,
            Tier = tier,
            DataFile = dataFile,
            DataFileRaw = Flag("data_file_raw"),
            BackingFile = backingFile,
            BackingFormat = backingFormat,
            BackingPolicy = unsafeBacking ? QcowBackingPolicy.Ignore : QcowBackingPolicy.Follow,
            CompressionType = compression,
            ExtendedL2 = extendedL2,
        };
    }

    /// <summary>Raw preallocation: off, falloc or full, as file-posix offers them.</summary>
    public string RawPreallocation()
        => Text("preallocation") switch
        {
            null or "off" => "off",
            "falloc" => "falloc",
            "full" => "full",
            var other => throw new CliException($"Parameter 'preallocation' does not accept value '{other}'"),
        };
}
