using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Disks;

/// <summary>Opens an image as qemu-img does: the format from -f, else from the magic number (never the name).</summary>
internal static class DiskOpener
{
    private static readonly AsyncLocal<bool> ForceShareFlag = new();

    /// <summary>-U / --force-share for the verb being run: open without QEMU's image locks.</summary>
    public static bool ForceShare
    {
        get => ForceShareFlag.Value;
        set => ForceShareFlag.Value = value;
    }

    /// <param name="noBacking">Do not open a qcow2 image's backing file (qemu-img info's BDRV_O_NO_BACKING).</param>
    /// <param name="snapshot">An internal snapshot (id, else name) of a qcow2 image to open instead of its active disk.</param>
    public static Disk Open(string path, string? format, bool writable, CacheMode cache = default, bool noBacking = false, string? snapshot = null)
    {
        var fmt = format ?? Probe(path);
        try
        {
            return fmt switch
            {
                "qcow2" => OpenQcow(path, writable, cache, noBacking, snapshot),
                "raw" when snapshot is not null => throw new CliException($"Could not open '{path}': snapshots are a qcow2 feature"),
                "raw" => new RawDisk(path, writable, cache),
                _ => throw new CliException($"Could not open '{path}': Unknown driver '{fmt}'"),
            };
        }
        catch (CliException)
        {
            throw;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or InvalidOperationException or NotSupportedException or ArgumentException)
        {
            throw new CliException($"Could not open '{path}': {Describe(e)}", e);
        }
    }

    private static QcowDisk OpenQcow(string path, bool writable, CacheMode cache, bool noBacking, string? snapshot)
    {
        if (!QcowImage.IsQcow2(path))
        {
            throw new CliException($"Could not open '{path}': Image is not in qcow2 format");
        }
        try
        {
            return new QcowDisk(path, writable, cache, noBacking, snapshot: snapshot);
        }
        catch (QcowSnapshotNotFoundException) when (snapshot is not null)
        {
            throw new CliException($"Failed to load snapshot: Can't find snapshot");
        }
    }

    /// <summary>"qcow2" when the file starts with the qcow2 magic, otherwise "raw".</summary>
    public static string Probe(string path)
    {
        try
        {
            return QcowImage.IsQcow2(path) ? "qcow2" : "raw";
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new CliException($"Could not open '{path}': {Describe(e)}", e);
        }
    }

    private static readonly string[] OtherQemuFormats = ["bochs", "cloop", "dmg", "luks", "parallels", "qcow", "qed", "vdi", "vhdx", "vmdk", "vpc", "vvfat"];

    /// <summary>Checks a -f/-O value of create and convert names a format we handle, with qemu-img's wording.</summary>
    public static void CheckFormat(string? format)
    {
        if (format is not null and not "qcow2" and not "raw")
        {
            throw new CliException(OtherQemuFormats.Contains(format)
                ? $"Unsupported file format '{format}' (qcowtier handles qcow2 and raw)"
                : $"Unknown file format '{format}'");
        }
    }

    /// <summary>The strerror-like part of an exception's message, as QEMU words it.</summary>
    public static string Describe(Exception e) => e switch
    {
        FileNotFoundException or DirectoryNotFoundException => "No such file or directory",
        UnauthorizedAccessException => "Permission denied",
        _ => e.Message,
    };
}
