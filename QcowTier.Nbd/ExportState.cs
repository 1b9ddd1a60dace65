using System.Numerics;
using QcowTier.Heat;

namespace QcowTier.Nbd;

/// <summary>An export while served: its image, what it advertises, and its heat recording.</summary>
internal sealed class ExportState
{
    private readonly object _heatGate = new();
    private HeatMap? _previousRecorder;

    public ExportState(NbdExport export, int maxPayload)
    {
        Export = export;
        Image = export.Image;
        ReadOnly = export.IsReadOnly;
        Size = Image.Size;
        // Byte-granular I/O works (the engine does any read-modify-write); whole clusters avoid it.
        MinimumBlock = 1;
        PreferredBlock = Math.Max(512, (int)BitOperations.RoundUpToPowerOf2((uint)Image.ClusterSize));
        MaximumPayload = Math.Max(maxPayload, PreferredBlock);
        // Zero clusters only exist from version 3 on; a version 2 image zeroes by writing.
        FastZero = Image.Version >= 3;
    }

    public NbdExport Export { get; }

    public QcowImage Image { get; }

    public string Name => Export.Name;

    public bool ReadOnly { get; }

    public long Size { get; }

    public int MinimumBlock { get; }

    public int PreferredBlock { get; }

    public int MaximumPayload { get; }

    public bool FastZero { get; }

    public HeatMap? Heat { get; private set; }

    /// <summary>The transmission flags of this export for a connection that did or did not negotiate structured replies.</summary>
    public ushort TransmissionFlags(bool structured)
    {
        var f = (ushort)(Protocol.TxHasFlags | Protocol.TxSendFlush | Protocol.TxSendFua | Protocol.TxCanMultiConn | Protocol.TxSendCache);
        if (ReadOnly)
        {
            f |= Protocol.TxReadOnly;
        }
        else
        {
            f |= Protocol.TxSendTrim | Protocol.TxSendWriteZeroes | Protocol.TxSendFastZero;
        }
        if (structured)
        {
            f |= Protocol.TxSendDf;
        }
        return f;
    }

    public void StartHeat()
    {
        if (Export.HeatFile is not { } path)
        {
            return;
        }
        var id = Image.HeatIdentity;
        // Adds to an existing map of this image (a map of another image is refused), or starts one.
        var heat = File.Exists(path) ? HeatMap.Load(path, id) : new HeatMap(Image.Size, Image.ClusterSize, imageId: id);
        lock (_heatGate)
        {
            _previousRecorder = Image.HeatRecorder;
            Image.HeatRecorder = heat;
            Heat = heat;
        }
    }

    public void SaveHeat()
    {
        lock (_heatGate)
        {
            if (Heat is not null && Export.HeatFile is { } path)
            {
                Heat.Save(path);
            }
        }
    }

    public void StopHeat(bool save)
    {
        lock (_heatGate)
        {
            if (Heat is null)
            {
                return;
            }
            if (ReferenceEquals(Image.HeatRecorder, Heat))
            {
                Image.HeatRecorder = _previousRecorder;
            }
            var heat = Heat;
            Heat = null;
            if (save && Export.HeatFile is { } path)
            {
                heat.Save(path);
            }
        }
    }
}
